"""Entry point: ``deepspeed [--num_gpus N | --hostfile H] launch/run.py --spec JOB.yaml``,
or ``python launch/run.py --spec JOB.yaml --check``. The command line itself lives in
``distill_engine/cli/main.py``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

from distill_engine.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
