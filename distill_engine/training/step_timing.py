"""Where a step's time goes: the teacher's forward, the student's forward and backward, the
optimizer step (and, measured by the trainer, the wait for data) as shares of the step, and
the stage's model FLOPs utilisation (MFU).

The trainer marks the boundaries between the parts of each micro-batch (``mark``). On an
asynchronous accelerator (CUDA) a mark records an event on the current stream, and a part's
time is read from its events once they have completed (``Event.query``): timing adds no
synchronisation, and a step whose events are still pending is counted at a later step. On
the CPU, where each call returns when its work is done, a mark reads the host's clock.

MFU = the model FLOPs a rank computes per step / the step's seconds / the device's peak
FLOP/s. The model FLOPs are counted on the meta-device models the plan traced (the teacher
pruned as it runs, fed the token subset it is fed; the student's forward, and its backward
counted as twice the forward, the usual convention): the objectives' heads and losses are
not counted, nor a second student pass. The peak is ``deepspeed.device_peak_flops`` when
the spec gives it, else what a square matmul in the student's dtype achieves on this device
when the stage starts (the fastest of three bursts of about 50 ms).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch

PARTS = ("teacher", "student", "optimizer")


class StepTiming:
    """Seconds per part of each step: ``begin_step``, then per micro-batch ``mark()`` where
    timing starts and ``mark(part)`` where each part ends, then ``end_step``; ``take``
    returns the parts of the steps that have completed."""

    def __init__(self, device: torch.device):
        self.events = torch.device(device).type == "cuda"
        self._marks: list[tuple[str | None, Any]] = []
        # Bounded: a caller that never takes (a benchmark's loop) keeps the latest steps only.
        self._steps: deque[list[tuple[str | None, Any]]] = deque(maxlen=1024)

    def begin_step(self) -> None:
        self._marks = []  # a step left out (a non-finite loss) leaves no parts behind

    def mark(self, part: str | None = None) -> None:
        """The end of ``part`` (the time since the previous mark), or with no part, the
        point from which the next part is timed."""
        if self.events:
            now = torch.cuda.Event(enable_timing=True)
            now.record()
        else:
            now = time.perf_counter()
        self._marks.append((part, now))

    def end_step(self) -> None:
        self._steps.append(self._marks)
        self._marks = []

    def take(self) -> dict[str, float]:
        """``{part}_s`` summed over the steps ended since the last call whose events have
        completed (all of them on the CPU); the others are counted by a later call."""
        seconds = dict.fromkeys((f"{part}_s" for part in PARTS), 0.0)
        while self._steps and self._completed(self._steps[0]):
            marks = self._steps.popleft()
            for (_, start), (part, end) in zip(marks, marks[1:]):
                if part is not None:
                    seconds[f"{part}_s"] += (start.elapsed_time(end) / 1e3 if self.events
                                             else end - start)
        return {key: round(value, 5) for key, value in seconds.items()}

    def _completed(self, marks) -> bool:
        return not self.events or not marks or marks[-1][1].query()


# ---------------------------------------------------------------------------- FLOPs

def forward_flops(model: torch.nn.Module, family, inputs: Any) -> int:
    """FLOPs of one forward of ``model`` (meta tensors are fine: attention is counted as
    the matmuls it decomposes into there)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        family.forward(model, inputs)
    return counter.get_total_flops()


def model_flops_per_sample(plan) -> dict[str, float]:
    """The teacher's forward and the student's forward + backward FLOPs per sample, on the
    meta-device models of the plan (``plan.models.tap_shapes``)."""
    from distill_engine.families import token_subset
    shapes = plan.models.tap_shapes
    flops = {"teacher": 0.0, "student": 0.0}
    student = shapes.student_model
    if student is not None:
        family = plan.student.family
        flops["student"] = 3.0 * forward_flops(student, family,
                                               family.example_input(student, plan.input_shape))
    teacher = shapes.teacher_model
    if teacher is not None and plan.teacher is not None:
        family = plan.teacher.family
        inputs = family.example_input(teacher, plan.input_shape)
        keep = min((getattr(o, "teacher_tokens", 1.0) for o in plan.spec.objectives), default=1.0)
        if keep < 1.0:
            inputs = token_subset.with_subset(inputs, keep, None)
        flops["teacher"] = float(forward_flops(teacher, family, inputs))
    return flops


# ---------------------------------------------------------------------------- peak

def matmul_peak_flops(device: torch.device, dtype: torch.dtype, bursts: int = 3) -> float:
    """FLOP/s of a square matmul in ``dtype`` on ``device``, the fastest of a few bursts of
    about 50 ms (other work on a shared machine slows some bursts, never speeds one up): the
    machine's achievable peak. A one-off at set-up, so it may wait for the device."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = 8192 if cuda else 1024
    # Its own generator: the probe must not move the global one that seeds drop path & co.
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, generator=generator).to(dtype) for _ in "ab")

    def burst(repeats: int) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - started
    burst(2)  # warm-up: kernels chosen, caches filled
    repeats = 1
    while (elapsed := burst(repeats)) < 0.05 and repeats < 256:
        repeats *= 4
    fastest = min([elapsed] + [burst(repeats) for _ in range(bursts - 1)])
    return 2 * size ** 3 * repeats / fastest


def flop_rate(value: float) -> str:
    """``8.9 GFLOP/s``, ``989 TFLOP/s``."""
    return f"{value / 1e12:.3g} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.3g} GFLOP/s"


def peak_flops(device: torch.device, dtype: torch.dtype, given: float | None) -> tuple[float, str]:
    """The device's peak FLOP/s and where it comes from."""
    if given:
        return float(given), "deepspeed.device_peak_flops"
    return matmul_peak_flops(device, dtype), f"a {str(dtype).removeprefix('torch.')} matmul on {device}"


def stage_flops(plan, device: torch.device, dtype: torch.dtype,
                log=None) -> tuple[float | None, float | None]:
    """The model FLOPs one rank computes per step, and the device's peak FLOP/s; said once
    in the log when ``log`` is given. (None, None) when the models' FLOPs cannot be counted
    (a model whose meta-device forward the counter cannot follow): then no MFU is shown."""
    try:
        per_sample = model_flops_per_sample(plan)
    except Exception as err:  # a count for the logs must never stop a training run
        if log is not None:
            log.warning("%s: no MFU: counting the models' FLOPs failed (%s)", plan.spec.name,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None, None
    samples = plan.spec.data.micro_batch_size * plan.spec.optimisation.gradient_accumulation_steps
    flops = samples * (per_sample["teacher"] + per_sample["student"])
    peak, source = peak_flops(device, dtype, plan.spec.deepspeed.device_peak_flops)
    if log is not None:
        log.info("%s: %.3g GFLOP per step per rank (teacher forward %.3g, student forward and "
                 "backward %.3g); MFU against %s (%s)", plan.spec.name, flops / 1e9,
                 samples * per_sample["teacher"] / 1e9, samples * per_sample["student"] / 1e9,
                 flop_rate(peak), source)
    return flops, peak


# ---------------------------------------------------------------------------- a stage's figures

SHARES = ("teacher", "student", "optimizer", "data_wait")


def stage_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's time shares and MFU over its logged records, the first (start-up) left
    out when there are others; each record weighs as many steps as it averages."""
    steady = records[1:] if len(records) > 1 else records
    weights = [r.get("steps_averaged", 1) for r in steady]
    total = sum(weights)

    def mean(key: str) -> float | None:
        if not total or any(key not in r for r in steady):
            return None
        return round(sum(w * r[key] for w, r in zip(weights, steady)) / total, 4)
    shares = {part: mean(f"{part}_share") for part in SHARES}
    return {"time_shares": shares if all(v is not None for v in shares.values()) else None,
            "mfu": mean("mfu")}
