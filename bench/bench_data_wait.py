"""Data: the engine's time waiting for the next batch as a share of step time, from the
``metrics.jsonl`` of a quickstart run (``data_wait_s`` / ``step_s`` per logged step; goal
under 5%). Without ``--run-dir`` it runs the quickstart's first two stages (teacher, FD) on
2 ranks, logging every step, in a temporary run directory.

    python bench/bench_data_wait.py [--run-dir runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run_quickstart(run_dir: Path) -> None:
    """The quickstart job's teacher and distil stages, every step logged."""
    import yaml
    data = common.ROOT / "data" / "digits"
    if not (data / "train" / "index.json").is_file():
        subprocess.run([sys.executable, "-m", "data_shards", "pack", "sklearn:digits", "--out",
                        str(data), "--prefix", "digits", "--holdout", "0.2", "--seed", "0",
                        "--max-samples-per-shard", "300"], check=True, cwd=common.ROOT)
    spec = yaml.safe_load((common.ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["stages"] = spec["stages"][:2]
    spec["run_dir"] = str(run_dir)
    spec["logging"] = {"every_steps": 1, "plot": False}
    path = run_dir.parent / "quickstart_two_stages.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    common.launch(common.ROOT / "launch" / "run.py", "--spec", str(path), ranks=2, timeout=900)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="bench_data_wait_")) / "run"
        run_quickstart(run_dir)
    rows, totals = [], {"wait": 0.0, "step": 0.0}
    for metrics in sorted(run_dir.glob("*/metrics.jsonl")):
        records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        records = [r for r in records if "data_wait_s" in r]
        # Step 1 includes the loader workers' start-up; it is reported apart.
        steady = [r for r in records if r["step"] > 1]
        wait, step = sum(r["data_wait_s"] for r in steady), sum(r["step_s"] for r in steady)
        first = records[0] if records else None
        totals["wait"] += wait
        totals["step"] += step
        rows.append(f"| {metrics.parent.name} | {len(steady)} | {wait:.2f} | {step:.2f} | "
                    f"{100 * wait / step:.1f}% | "
                    f"{first['data_wait_s']:.2f} of {first['step_s']:.2f} s |" if steady else "")
    share = totals["wait"] / totals["step"]
    body = (f"Quickstart (2 CPU ranks, ZeRO-3, digits shards, 1 loader worker per rank), run dir "
            f"`{run_dir}`. Logged steps after the first; rank 0's measurements.\n\n"
            f"| stage | logged steps | data wait (s) | step time (s) | share | step 1 (worker start-up) |\n"
            f"|---|---|---|---|---|---|\n" + "\n".join(r for r in rows if r) +
            f"\n\n**Data wait / step time, all stages: {100 * share:.2f}%** (goal under 5%)")
    print(body)
    if not args.no_record:
        common.record("Data wait", body)
    print(f"ratio data wait / step time: {share:.4f}")


if __name__ == "__main__":
    main()
