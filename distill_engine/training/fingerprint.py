"""What a stage was started with, and what may change when it is run again.

A stage's fingerprint is its resolved spec: the stage's section of the job spec with the
inherited defaults merged in, and its models as concrete recipes (``stage:NAME`` replaced
by the architecture, kwargs and weights file it names). Rank 0 writes it to
``<stage>/spec_fingerprint.json`` when the stage starts; each checkpoint's ``COMPLETE``
marker and the export's ``model.json`` carry a copy.

On every later run the current spec is compared with it before anything is built. Fields
that only say how long to train or what to report may change on resume (``ALLOWED``);
the change is logged and recorded in the file's ``changes``. Anything else (architecture,
learning rate, data, objectives...) would silently continue a run of one spec with
another, so the run stops with exit 2, the differences (old -> new, by field path) and the
ways forward: another ``run_dir``, or ``--restart-from STAGE``, which moves that stage's
directory and those of the stages after it aside and starts them again.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from distill_engine.planning.job import JobPlan, StagePlan

log = logging.getLogger("distill_engine")

FILE = "spec_fingerprint.json"
_MISSING = object()  # a field one of the two specs does not have

# Field paths (prefixes) of a stage that may differ between the run that started a stage
# and one that resumes it: how long to train, what to report, how often to save, and how
# to react to faults (the non-finite-loss message itself suggests on_nonfinite: skip).
ALLOWED = ("optimisation.steps", "optimisation.epochs", "logging.", "checkpointing.every_steps",
           "checkpointing.keep", "checkpointing.resume", "eval", "data.eval",
           "deepspeed.timeout_s", "optimisation.on_nonfinite",
           "optimisation.max_consecutive_skips", "data.max_bad_samples", "teacher.allow_wrap")


def of_stage(plan: StagePlan) -> dict[str, Any]:
    """The stage's resolved spec as plain JSON values."""
    spec = plan.spec.model_dump(mode="json")
    if plan.refs.student is not None:  # a recording stage has none
        spec["student"].update(arch=plan.student.arch, kwargs=_plain(plan.student.kwargs),
                               init=str(plan.student_init) if plan.student_init else "scratch")
    if plan.teacher is not None:
        spec["teacher"].update(arch=plan.teacher.arch, kwargs=_plain(plan.teacher.kwargs),
                               weights=str(plan.teacher.weights) if plan.teacher.weights else None)
    return spec


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _is_allowed(path: str) -> bool:
    return any(path == a or path.startswith(a if a.endswith(".") else a + ".") or
               (not a.endswith(".") and path.startswith(a + "[")) for a in ALLOWED)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field path, old value, new value) of every field that differs."""
    old_flat, new_flat = _flat(old), _flat(new)
    return [(path, old_flat.get(path, _MISSING), new_flat.get(path, _MISSING))
            for path in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(path, _MISSING) != new_flat.get(path, _MISSING)]


def _recorded(plan: StagePlan) -> dict[str, Any] | None:
    try:
        return json.loads((plan.dir / FILE).read_text())
    except (OSError, ValueError):
        return None


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else json.dumps(value, default=str)


def changed_stages(job: JobPlan, restarting: str | None = None) -> str | None:
    """The paragraph to print when a stage already started with another spec, or None.
    Stages from ``restarting`` on start again and are not compared. Reads only; every
    rank reaches the same verdict."""
    lines = []
    names = [p.name for p in job.stages]
    for plan in job.stages[:names.index(restarting) if restarting in names else None]:
        recorded = _recorded(plan)
        if recorded is None:
            continue
        forbidden = [d for d in differences(recorded["spec"], of_stage(plan))
                     if not _is_allowed(d[0])]
        if forbidden:
            lines.append(f"stage {plan.name!r} was started with another spec "
                         f"({plan.dir / FILE}); changed since:")
            lines += [f"  stages[{plan.index}].{path}: {_show(old)} -> {_show(new)}"
                      for path, old, new in forbidden]
    if not lines:
        return None
    first = next(p.name for p in job.stages if any(f"stage {p.name!r}" in l for l in lines))
    return "\n".join([
        f"error: {job.source}: the run in {job.spec.run_dir} cannot continue with this spec.",
        *lines,
        "Resuming may change only " + ", ".join(a.rstrip(".") for a in ALLOWED) + ". "
        "To train with the new values, use a new run_dir, or rerun with --restart-from "
        f"{first} to start stage {first!r} and every stage after it again (their "
        "directories are moved aside, not deleted); or undo the change to resume."])


def record(plan: StagePlan) -> None:
    """Rank 0, when a stage starts: writes its fingerprint, or records the allowed
    changes since the last run (``changed_stages`` has already refused the others)."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    current = of_stage(plan)
    recorded = _recorded(plan) or {"spec": current, "started": now, "changes": []}
    changes = differences(recorded["spec"], current)
    for path, old, new in changes:
        log.info("%s: %s changed since the stage started: %s -> %s", plan.name, path,
                 _show(old), _show(new))
        recorded["changes"].append({"at": now, "field": path, "old": _show(old),
                                    "new": _show(new)})
    recorded["spec"] = current
    plan.dir.mkdir(parents=True, exist_ok=True)
    tmp = plan.dir / (FILE + ".tmp")
    tmp.write_text(json.dumps(recorded, indent=1))
    tmp.replace(plan.dir / FILE)


def restart_from(job: JobPlan, stage: str) -> None:
    """Rank 0, holding the run directory's lock: moves the directories of ``stage`` and the
    stages after it aside (``NAME.replaced-TIME``), so that they start again."""
    names = [p.name for p in job.stages]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    for plan in job.stages[names.index(stage):]:
        if plan.dir.exists():
            aside = plan.dir.with_name(f"{plan.dir.name}.replaced-{stamp}")
            plan.dir.rename(aside)
            log.info("--restart-from %s: moved %s aside to %s", stage, plan.dir, aside)
