"""Labels against the student's classes, from the shard index, at ``--check``.

The index that ``python -m data_shards pack`` writes lists the class names; the labels are
indices into that list. A student with fewer outputs than the data has classes would end
training in "Target 12 is out of bounds" and would count held-out samples of those classes
as wrong answers. Shards whose index cannot say (no index, hand-made shards) are checked
sample by sample at run time, where an out-of-range label is a bad sample.
"""

from __future__ import annotations

from distill_engine.spec.schema import StageSpec

from .job import ModelSummary, Problems
from .references import read_index


def index_classes(url) -> int | None:
    """How many classes the shard index of a local directory or index file lists."""
    if not isinstance(url, str):
        return None
    classes = (read_index(url) or {}).get("classes")
    return len(classes) if isinstance(classes, list) and classes else None


def check_labels(stage: StageSpec, here: str, models: ModelSummary, problems: Problems) -> None:
    predicted = models.num_classes
    uses = [("train", stage.data.train)] if any(o.needs_labels for o in stage.objectives) else []
    # Only a head scores the held-out labels; a stage that trains none is evaluated by kNN
    # of its features (and its held-out loss), where the labels only vote.
    if stage.eval is not None and any(o.trains_classifier for o in stage.objectives):
        uses.append(("eval", stage.data.eval))
    for key, url in uses:
        classes = index_classes(url)
        if classes is None:
            continue
        if predicted is None or classes > predicted:
            has = (f"its output is {list(models.student_output)}" if predicted is None
                   else f"it predicts {predicted}")
            # Reported where the fix goes: the student's classes, not the data.
            problems.append((f"{here}.student.kwargs.num_classes",
                             f"the index of data.{key} {url} lists {classes} classes (labels "
                             f"0..{classes - 1}), but the student cannot score them: {has}; "
                             f"set num_classes: {classes}"))
