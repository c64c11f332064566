"""One stage of distillation, step by step.

    stream ──> batch ──> teacher (frozen, replicated or ZeRO-3, pruned) ──> teacher taps
                    └──> student engine (+ objective heads) ──> weighted loss ──> backward, step

Everything the stage needs was decided by planning (``planning.job.StagePlan``: models,
traced shapes, steps, placement); this module only runs it. Every rank runs exactly the
same sequence of teacher and student calls (the stream gives each rank the same number of
batches), so no rank ever waits at a collective alone.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from typing import Any

import torch
import torch.distributed as dist
import yaml

from data_shards import DataError, ShardStream
from data_shards.keys import derive_seed
from data_shards.stream import TargetsReplay
from data_shards.targets import TargetsIndex
from distill_engine.accelerator import device
from distill_engine.modeling.inputs import model_inputs, to_model
from distill_engine.objectives import RECORDED_TAPS
from distill_engine.planning.job import JobPlan, RecordPlan, StagePlan, StepCount
from distill_engine.planning.references import count_steps
from distill_engine.tensors import first_tensor

from . import checkpoints, fingerprint, preemption, step_timing
from .engines import build_student, build_teacher, shard_counts
from .evaluation import Evaluation
from .export import class_names, make_readable, preprocessing, save_export
from .models import StudentModel
from .plots import plot_losses, plot_summary
from .progress import StageProgress, read_metrics
from .recording import RecordingStage

log = logging.getLogger("distill_engine")


class NonFiniteLoss(RuntimeError):
    pass


def all_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:  # one rank: nothing to average
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class StageTrainer:
    def __init__(self, job: JobPlan, plan: StagePlan):
        self.job, self.plan, self.spec = job, plan, plan.spec
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = device()
        self.checkpoint_dir = plan.dir / "checkpoints"

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        if self.rank == 0:
            fingerprint.record(self.plan)  # what the stage runs with; changes since, noted
        self.stream = self.open_stream()
        steps = self.step_count()
        self.total_steps = steps.total
        self.build_engines(steps.total, steps.warmup)
        if self.spec.checkpointing.resume:
            self.resume()
        self.saved_step = self.step  # the step of the newest complete checkpoint
        # Seed drop path & co. per rank, unless a checkpoint restored the RNG.
        if self.step == 0:
            torch.manual_seed(self.job.spec.seed + 1000 * self.plan.index + self.rank)
        self.batches = iter(self.stream)

    def open_stream(self) -> ShardStream:
        data = self.spec.data
        replay = None
        if self.plan.refs.targets is not None:
            # Recorded targets: the recorded order and views, and only the student's view
            # (the teacher's view was what the recording needed).
            views = data.views.views
            replay = TargetsReplay(TargetsIndex.load(self.plan.refs.targets.directory),
                                   self.plan.teacher_taps,
                                   views=["student"] if "student" in views else
                                   ["image"] if "image" in views else None)
        return ShardStream(
            data.train, batch_size=data.micro_batch_size, rank=self.rank,
            world_size=self.world_size, num_workers=data.num_workers,
            seed=self.job.spec.seed + data.seed, views=data.views, text=data.text,
            samples_per_epoch=data.samples_per_epoch, max_bad_samples=data.max_bad_samples,
            allow_pipe=data.allow_pipe, max_image_pixels=data.max_image_pixels,
            # A label the loss cannot take is a bad sample (naming shard and key), not a crash.
            num_classes=self.plan.models.num_classes
            if any(o.needs_labels for o in self.spec.objectives) else None,
            targets=replay)

    def step_count(self) -> StepCount:
        """The plan's step count. Planning counted the batches of an epoch from the shards'
        index; the stream is the authority on them, so the two must agree. Where planning
        could read no index (remote shards), the plan leaves them to the stream."""
        planned, streamed = self.plan.steps, self.stream.batches_per_epoch
        if planned.batches_per_epoch is None:
            return count_steps(self.spec, self.world_size, streamed)
        if planned.batches_per_epoch != streamed:
            raise DataError(
                f"stage {self.spec.name!r}: the plan counted {planned.batches_per_epoch} batches "
                f"an epoch from {self.spec.data.train}, the stream counts {streamed}: the "
                f"shards' index changed after the job was planned; run the command again")
        return planned

    def build_engines(self, total_steps: int, warmup_steps: int) -> None:
        """The teacher and student engines, at step 0 (benchmarks call this without a stream),
        where the plan placed them."""
        placement = self.plan.placement
        if self.rank == 0:
            for chosen in (placement.teacher, placement.student):
                if chosen is not None:
                    log.info("%s: %s", self.spec.name, chosen.describe())
        self.teacher = self.teacher_dtype = None
        if self.plan.teacher is not None:
            self.teacher, self.teacher_dtype = build_teacher(self.plan, self.job.spec.seed,
                                                             placement.teacher)
            self.record_teacher_shards()
        self.student, self.student_dtype = build_student(self.plan, total_steps, warmup_steps,
                                                         self.job.spec.seed, placement.student)
        self.step = 0
        self.skipped_steps = self.skipped_in_a_row = 0
        self.timing = step_timing.StepTiming(self.device)

    def resume(self) -> None:
        """From the newest complete checkpoint, if there is one; at another world size the
        stream restarts at the batch that covers the samples already seen."""
        tag = checkpoints.newest_verified(self.checkpoint_dir)
        if tag is None:
            return
        state = checkpoints.resume(self.student, self.checkpoint_dir, tag)
        self.step = state["step"]
        self.skipped_steps = state.get("nonfinite_skipped_steps", 0)
        stream_state = state["stream"]
        if state["saved_world_size"] != self.world_size:
            stream_state = checkpoints.stream_state_after(
                stream_state, state["saved_world_size"], self.world_size,
                self.spec.data.micro_batch_size, self.stream.batches_per_epoch)
            log.info("%s: saved at %d ranks, resumed at %d: weights, optimizer state, "
                     "step and schedule carry over; the rest of the epoch is drawn "
                     "in another sample order", self.spec.name,
                     state["saved_world_size"], self.world_size)
        self.stream.load_state_dict(stream_state)
        log.info("%s: resumed from %s (step %d)", self.spec.name, state["tag"], self.step)

    def record_teacher_shards(self) -> None:
        """How many teacher parameters each rank holds, in ``teacher_shards.json``."""
        held, total = shard_counts(self.teacher.module.model)
        per_rank = [None] * self.world_size
        if dist.is_initialized():
            dist.all_gather_object(per_rank, held)
        else:
            per_rank = [held]
        if self.rank == 0:
            self.plan.dir.mkdir(parents=True, exist_ok=True)
            (self.plan.dir / "teacher_shards.json").write_text(json.dumps(
                {"total": total, "held_per_rank": per_rank}, indent=2))

    # ------------------------------------------------------------------ one step

    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], float] | None:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches). Returns the
        rank-averaged loss, its terms, and the seconds spent waiting for data; or None when
        the loss was not finite and ``on_nonfinite: skip`` left the step out (no backward,
        no optimizer step: weights and optimizer state stay as they were)."""
        data_wait = 0.0
        self.timing.begin_step()
        for micro in range(self.spec.optimisation.gradient_accumulation_steps):
            started = time.perf_counter()
            batch = next(self.batches)
            data_wait += time.perf_counter() - started
            self.bad_samples_here = batch.get("bad_samples", 0)  # skipped by this rank's stream
            recorded = batch.pop(RECORDED_TAPS, None)
            batch = to_model(batch, self.device, torch.float32)
            if recorded is not None:  # in their recorded dtype: the objectives cast them
                batch[RECORDED_TAPS] = {tap: value.to(self.device, non_blocking=True)
                                        for tap, value in recorded.items()}
            losses = self.forward_backward(batch, micro)
            if losses is None:
                return None
        self.skipped_in_a_row = 0
        self.timing.end_step()
        total, terms = losses
        return total, terms, data_wait

    def forward_backward(self, batch: dict[str, Any], micro: int
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """One micro-batch: teacher taps, the student's loss, backward, and the engine's step
        (which applies the update at the accumulation boundary). Returns the rank-averaged
        loss and its terms, or None when the non-finite policy skipped the step."""
        # A mask drawn here is a function of (seed, stage, step, micro-batch, rank): a
        # resumed run draws the same one without saving any generator state.
        generator = torch.Generator(self.device).manual_seed(derive_seed(
            self.job.spec.seed, self.plan.index, self.step + 1, micro, self.rank))
        batch = self.student.module.prepare(batch, generator)
        self.timing.mark()
        teacher_taps = batch.get(RECORDED_TAPS, {})  # recorded targets, as the teacher gave them
        if self.teacher is not None:
            teacher_taps = self.teacher(to_model(model_inputs(batch, "teacher"), self.device,
                                                 self.teacher_dtype))
        self.timing.mark("teacher")
        student_input = to_model(model_inputs(batch, "student"), self.device, self.student_dtype)
        total, terms = self.student(StudentModel.loss, student_input, teacher_taps, batch)
        # Averaged over ranks, so that every rank reaches the same verdict on a non-finite
        # loss and all stop or skip together.
        losses = all_mean(torch.stack([total.detach().float()] +
                                      [t.detach().float() for t in terms.values()]))
        if not torch.isfinite(losses).all():
            self.on_nonfinite(dict(zip(["total", *terms], losses.tolist())))
            return None
        self.student.backward(total)
        self.timing.mark("student")
        self.student.step()
        self.timing.mark("optimizer")
        return losses[0], dict(zip(terms, losses[1:]))

    def on_nonfinite(self, losses: dict[str, float]) -> None:
        """The policy for a non-finite loss (``optimisation.on_nonfinite``): ``stop`` raises;
        ``skip`` leaves the step out, until more than ``max_consecutive_skips`` in a row."""
        optimisation = self.spec.optimisation
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        where = (f"stage {self.spec.name!r}, step {self.step + 1}: non-finite loss in "
                 f"{', '.join(bad)}")
        if optimisation.on_nonfinite != "skip":
            raise NonFiniteLoss(
                f"{where}; the step was not applied and no checkpoint holds its "
                f"weights (lower the learning rate, enable grad_clip, check the data, or "
                f"set optimisation.on_nonfinite: skip)")
        self.skipped_in_a_row += 1
        self.skipped_steps += 1
        if self.skipped_in_a_row > optimisation.max_consecutive_skips:
            raise NonFiniteLoss(
                f"{where}; {self.skipped_in_a_row} steps in a row were non-finite "
                f"(optimisation.max_consecutive_skips is "
                f"{optimisation.max_consecutive_skips}), so the run stops; the "
                f"newest checkpoint holds finite weights (lower the learning rate, "
                f"enable grad_clip, or check the data)")
        if self.rank == 0:
            log.warning("%s; step skipped (weights and optimizer state unchanged; "
                        "%d in a row)", where, self.skipped_in_a_row)

    def bad_samples_all_ranks(self) -> int:
        count = torch.tensor([float(self.bad_samples_here)])
        return round(all_mean(count).item() * self.world_size)

    # ------------------------------------------------------------------ the loop

    def train(self, stop_after: int | None = None) -> dict[str, Any] | None:
        """Trains the stage to the end, or for at most ``stop_after`` steps in this run
        (saving a checkpoint there and returning None; the next run resumes)."""
        done = self.plan.export_dir / "metrics.json"
        if done.is_file():
            log.info("%s: already complete (%s); skipping", self.spec.name, done)
            return json.loads(done.read_text())
        self.started = time.perf_counter()
        self.setup()
        stop_at = self.total_steps if stop_after is None else min(self.total_steps,
                                                                   self.step + stop_after)
        every_log = self.spec.logging.every_steps
        every_save = self.spec.checkpointing.every_steps
        # Rank 0 logs, so it alone counts the FLOPs and probes the device's peak.
        flops_per_step, peak = step_timing.stage_flops(self.plan, self.device, self.student_dtype,
                                                       log) if self.rank == 0 else (None, None)
        progress = StageProgress(self.spec.name, self.plan.dir, self.total_steps, self.step,
                                 self.plan.global_batch, enabled=self.rank == 0,
                                 tensorboard=self.spec.logging.tensorboard, peak_flops=peak)
        evaluation = Evaluation(self.spec, self.device, self.student_dtype,
                                self.plan.models.num_classes)
        result: dict[str, Any] = {}
        first_loss = None
        try:
            while self.step < stop_at:
                if preemption.stop_requested_everywhere():
                    self.save_and_stop()
                started = time.perf_counter()
                lr = self.student.get_lr()[0]  # the step's own: the engine steps the schedule after it
                stepped = self.train_step()
                if stepped is None:
                    continue  # skipped: the step number is that of applied updates
                loss, terms, data_wait = stepped
                self.step += 1
                record = {"step": self.step, "loss": loss.item(),
                          **{f"loss/{k}": v.item() for k, v in terms.items()},
                          "lr": lr,
                          "skipped_steps": self.skipped_steps,
                          "bad_samples": self.bad_samples_all_ranks(),
                          "step_s": round(time.perf_counter() - started, 5),
                          "data_wait_s": round(data_wait, 5),
                          **self.timing.take(),
                          **({"model_flops": flops_per_step} if flops_per_step else {})}
                first_loss = first_loss if first_loss is not None else record["loss"]
                log_now = self.step % every_log == 0 or self.step in (1, self.total_steps)
                progress.step(self.step, record, log_now)
                if evaluation.due(self.step, self.total_steps):
                    progress.evaluation(self.step, evaluation(self.student))
                if self.step % every_save == 0 or self.step == stop_at:
                    self.save()
            if self.step == self.total_steps and evaluation.at_end():
                result = evaluation(self.student)
                progress.evaluation(self.step, result)
        finally:
            progress.close()
        if self.step < self.total_steps:
            log.info("%s: stopped after step %d of %d as asked; run the same command again to "
                     "resume", self.spec.name, self.step, self.total_steps)
            return None
        return self.finish(first_loss, result)

    def save(self) -> None:
        checkpoints.save(self.student, self.checkpoint_dir, self.step,
                         {"step": self.step, "stream": self.stream.state_dict(),
                          "stage": self.spec.name, "nonfinite_skipped_steps": self.skipped_steps},
                         keep=self.spec.checkpointing.keep,
                         marker={"spec": fingerprint.of_stage(self.plan)})
        self.saved_step = self.step

    def save_and_stop(self) -> None:
        """A rank was asked to stop (preemption.py): every rank has finished its step; save
        it unless the newest checkpoint already holds it, then stop on every rank."""
        if self.step != self.saved_step:
            self.save()
        raise preemption.Preempted(preemption.stop_reason(), preemption.stop_signal(),
                                   self.step, checkpoints.tag_of(self.step) if self.step else None)

    # ------------------------------------------------------------------ the end

    @torch.no_grad()
    def probe(self) -> dict[str, torch.Tensor]:
        """The engine's student on a fixed input, saved beside the export so that anyone
        can check that a reloaded export computes the same thing."""
        model, family = self.student.module.model, self.plan.student.family
        inputs = family.example_input(model, self.plan.input_shape, batch=2, device="cpu",
                                      generator=torch.Generator().manual_seed(0))
        self.student.eval()
        taps = self.student(StudentModel.taps, to_model(
            model_inputs({"student": inputs}, "student"), self.device, self.student_dtype))
        self.student.train()
        named = inputs if isinstance(inputs, dict) else {"": inputs}
        probe = {f"input{'/' + k if k else ''}": v for k, v in named.items()}
        for name, value in taps.items():
            value = first_tensor(value)
            if value is not None:
                probe[f"tap/{name}"] = value.detach().float().cpu().contiguous()
        return probe

    def finish(self, first_loss: float | None, evaluated: dict[str, Any]) -> dict[str, Any]:
        """Exports the student (in its family's format), the probe, the resolved spec and
        the metrics (with the last evaluation: ``accuracy`` of the head, or ``knn_accuracy``
        of the features, and ``heldout/TERM`` losses where ``eval.loss`` asked for them)."""
        plan = self.plan
        probe = self.probe()
        extra = {"stage": self.spec.name, "spec": fingerprint.of_stage(plan),
                 "data_config": preprocessing(self.spec.data),
                 "label_names": class_names(self.spec.data)}
        if self.spec.data.text is not None:  # a text student's export carries its tokenizer
            extra["tokenizer"] = self.spec.data.text.for_role("student")
        save_export(self.student.module.model, plan.student, plan.export_dir, extra=extra)
        if self.rank == 0:
            from safetensors.torch import save_file
            save_file(probe, str(plan.export_dir / "probe.safetensors"))
        summary = {
            "stage": self.spec.name,
            "teacher": (plan.refs.traced_teacher.arch if plan.refs.traced_teacher else None),
            "teacher_targets": str(plan.refs.targets.directory) if plan.refs.targets else None,
            "teacher_weights": str(plan.teacher.weights) if plan.teacher else None,
            "student": plan.student.arch, "steps": self.total_steps,
            "first_loss": first_loss, "last_loss": None,
            "accuracy": evaluated.get("accuracy"), "knn_accuracy": evaluated.get("knn_accuracy"),
            **{key: value for key, value in evaluated.items() if key.startswith("heldout/")},
            "export": str(plan.export_dir / "model.safetensors"),
            # Wall-clock of this run of the stage (set-up, training, evaluation, export); a
            # resumed stage counts its last run only.
            "seconds": round(time.perf_counter() - self.started, 2)
            if hasattr(self, "started") else None,
        }
        if self.rank == 0:
            records = read_metrics(plan.dir / "metrics.jsonl")
            if records:
                summary["first_loss"] = records[0]["loss"]
                summary["last_loss"] = records[-1]["loss"]
                summary.update(step_timing.stage_summary(records))  # time shares, MFU
            if self.spec.logging.plot:
                plot_losses(plan.dir, plan.dir / "loss.png",
                            f"{self.job.spec.name} / {self.spec.name}")
            (plan.export_dir / "spec.yaml").write_text(
                yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False))
            done = plan.export_dir / "metrics.json"
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(summary, indent=2))
            make_readable(plan.export_dir)
            tmp.replace(done)  # last: its presence marks the stage as complete
        if dist.is_initialized():
            dist.barrier()
        return summary

    def close(self) -> None:
        for name in ("student", "teacher", "batches", "stream"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()


def train_job(job: JobPlan, stop_after: int | None = None) -> list[dict[str, Any]] | None:
    """Runs the stages in order; a stage already exported is skipped, so rerunning a job
    resumes it. Returns the summary rows, or None when ``stop_after`` cut the run short."""
    rows = []
    for plan in job.stages:
        if isinstance(plan, RecordPlan):
            stage = RecordingStage(job, plan)
            run = stage.record
        else:
            stage = StageTrainer(job, plan)
            run = stage.train
        try:
            row = run(stop_after)
        finally:
            stage.close()
        if row is None:
            return None
        rows.append(row)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and job.spec.stages[-1].logging.plot:
        plot_summary(rows, [plan.dir for plan in job.stages], job.spec.run_dir / "summary.png",
                     job.spec.name)
    return rows
