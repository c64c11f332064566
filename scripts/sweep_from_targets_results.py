"""The table of jobs/sweep_from_targets.yaml: per student, its kNN accuracy and wall-clock
distilled from the records and distilled live, and the totals of both ways (the recording
once plus three students, against three live distillations).

    python scripts/sweep_from_targets_results.py runs/sweep_from_targets
"""

import json
import sys
from pathlib import Path

STUDENTS = ("tiny", "small", "base")


def main(run_dir: str) -> None:
    run = Path(run_dir)

    def summary(stage: str) -> dict:
        return json.loads((run / stage / "export" / "metrics.json").read_text())

    record = summary("record")
    print("| student | kNN acc. from records | kNN acc. live | s from records | s live |")
    print("|---|---|---|---|---|")
    totals = {"records": record["seconds"], "live": 0.0}
    for name in STUDENTS:
        replayed, live = summary(f"{name}_records"), summary(f"{name}_live")
        totals["records"] += replayed["seconds"]
        totals["live"] += live["seconds"]
        print(f"| {name} | {replayed['knn_accuracy']:.2%} | {live['knn_accuracy']:.2%} | "
              f"{replayed['seconds']:.0f} | {live['seconds']:.0f} |")
    print(f"| recording ({record['records']:,} records, {record['bytes'] / 2**20:.1f} MiB) | | | "
          f"{record['seconds']:.0f} | |")
    print(f"| **total** | | | **{totals['records']:.0f}** | **{totals['live']:.0f}** |")
    print(f"record once + 3 students / 3 live distillations, wall-clock: "
          f"{totals['records'] / totals['live']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep_from_targets")
