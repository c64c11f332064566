"""What ``--check`` and ``--plan`` print: the resolved plan, and the memory per GPU."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from distill_engine.planning.job import JobPlan, RecordPlan, StageMemory
from distill_engine.planning.memory import USABLE_FRACTION
from distill_engine.planning.targets import describe_targets, recording_bytes
from distill_engine.planning.text_checks import describe_text
from distill_engine.spec.units import gib
from distill_engine.training.evaluation import describe as describe_evaluation


def compact(names: list[str]) -> str:
    """``blocks.18, blocks.19, ..., blocks.23`` -> ``blocks.{18..23}``."""
    out: list[str] = []
    run: list[int] = []
    stem = None
    for name in names + [""]:
        head, _, tail = name.rpartition(".")
        if tail.isdigit() and head == stem and run and int(tail) == run[-1] + 1:
            run.append(int(tail))
            continue
        if run:
            out.append(f"{stem}.{run[0]}" if len(run) == 1 else f"{stem}.{{{run[0]}..{run[-1]}}}")
        stem, run = (head, [int(tail)]) if tail.isdigit() else (None, [])
        if not tail.isdigit() and name:
            out.append(name)
    return ", ".join(out)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e5 else f"{count:,}"


def print_plan(job: JobPlan, console: Console | None = None) -> None:
    console = console or Console()
    spec = job.spec
    console.print(f"[bold]{spec.name}[/bold]: {len(job.stages)} stage(s), run dir {spec.run_dir}, "
                  f"spec {job.source} is valid")
    for plan in job.stages:
        stage = plan.spec
        table = Table(title=f"stage {plan.index + 1}: {stage.name}", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        models = plan.models
        if isinstance(plan, RecordPlan):
            _recording_rows(table, plan)
            console.print(table)
            continue
        if plan.refs.targets is not None:
            table.add_row("teacher", describe_targets(plan))
            table.add_row("teacher taps", ", ".join(plan.teacher_taps) or "-")
        if plan.teacher is not None:
            kept = (f", {_millions(models.teacher_params_kept)} kept after pruning"
                    if models.pruned_teacher else "")
            table.add_row("teacher", f"{plan.teacher.arch} {plan.teacher.kwargs or ''} "
                          f"({_millions(models.teacher_params)} params{kept}); weights "
                          f"{plan.teacher.weights}")
            table.add_row("teacher taps", ", ".join(plan.teacher_taps) or "-")
            if models.pruned_teacher:
                table.add_row("teacher pruned", compact(models.pruned_teacher))
        init = plan.student_init or "random init"
        table.add_row("student", f"{plan.student.arch} {plan.student.kwargs or ''} "
                      f"({_millions(models.student_params)} params, heads "
                      f"{_millions(models.head_params)}); from {init}")
        table.add_row("student taps", ", ".join(plan.student_taps) or "-")
        if models.frozen_student:
            table.add_row("student frozen", compact(models.frozen_student) +
                          " (no objective reaches them)")
        table.add_row("objectives", "; ".join(
            f"{o.label} x {o.weight}" for o in stage.objectives))
        data, opt = stage.data, stage.optimisation
        table.add_row("batch", f"{data.micro_batch_size} per rank x {plan.world_size} ranks x "
                      f"{opt.gradient_accumulation_steps} accumulation = {plan.global_batch}")
        steps = plan.steps
        if opt.steps:
            budget = f"{opt.steps} steps"
        elif steps.total is not None:
            budget = (f"{opt.epochs} epochs = {steps.total} steps "
                      f"({steps.batches_per_epoch} batches per epoch per rank)")
        else:
            budget = f"{opt.epochs} epochs (steps unknown: no readable shard index)"
        warmup = (f"{steps.warmup} steps" if steps.warmup is not None
                  else f"{opt.warmup_epochs} epochs")
        table.add_row("optimisation", f"{opt.optimizer}, lr {plan.lr:.3g} ({opt.schedule}, "
                      f"{warmup} warm-up), {budget}, wd {opt.weight_decay}, "
                      f"clip {opt.grad_clip}")
        table.add_row("data", f"train {data.train}; eval {data.eval}; {_inputs(stage)}")
        table.add_row("evaluation", describe_evaluation(stage))
        for chosen in (plan.placement.teacher, plan.placement.student):
            if chosen is not None:
                config = f" ({chosen.config})" if chosen.config else ""
                table.add_row(f"{chosen.role} placement", f"{chosen.name}{config}: {chosen.why}")
        console.print(table)


def _inputs(stage) -> str:
    """What the models read: the tokenizers of a text stage, an image stage's views."""
    text = describe_text(stage)
    if text:
        return f"text, tokenizers {text}"
    return f"{stage.data.views.geometry.size}px views {list(stage.data.views.views)}"


def _recording_rows(table: Table, plan: RecordPlan) -> None:
    models, record, data = plan.models, plan.spec.record, plan.spec.data
    kept = (f", {_millions(models.teacher_params_kept)} kept after pruning"
            if models.pruned_teacher else "")
    table.add_row("teacher", f"{plan.teacher.arch} {plan.teacher.kwargs or ''} "
                  f"({_millions(models.teacher_params)} params{kept}); weights "
                  f"{plan.teacher.weights}")
    table.add_row("records", "; ".join(store.describe() for store in plan.stores))
    size = recording_bytes(plan)
    epochs = f"{record.epochs} epoch{'s' if record.epochs != 1 else ''}"
    count = (f"{epochs} x {plan.batches_per_epoch} batches x {data.micro_batch_size} "
             f"x {plan.world_size} ranks = {plan.records:,} records, ~{gib(size)}"
             if plan.records else f"{epochs} (size unknown: no readable shard index)")
    table.add_row("recording", f"{count}, into {plan.targets_dir} (no student: a stage reads "
                  f"them with teacher: {{targets: 'stage:{plan.name}'}})")
    table.add_row("objectives", "; ".join(f"{o.label} (for the students)" for o in plan.spec.objectives))
    table.add_row("data", f"train {data.train}; {_inputs(plan.spec)}")
    if plan.placement is not None and plan.placement.teacher is not None:
        chosen = plan.placement.teacher
        config = f" ({chosen.config})" if chosen.config else ""
        table.add_row("teacher placement", f"{chosen.name}{config}: {chosen.why}")


def print_memory(memories: list[StageMemory], gpu_memory: int | None, console=None) -> bool:
    """Rich tables, one per stage; returns whether every stage fits."""
    console = console or Console()
    for memory in memories:
        s = memory.settings
        table = Table(title=f"{memory.stage}: memory per GPU at {s.world_size} GPUs "
                            f"(micro-batch {s.micro_batch}, ZeRO-{s.zero_stage}, "
                            f"checkpointing {'on' if s.checkpointing else 'off'})")
        table.add_column("component")
        table.add_column("per GPU", justify="right")
        table.add_column("how")
        for line in memory.lines:
            table.add_row(line.what, gib(line.bytes), line.note)
        table.add_row("[bold]total[/bold]", f"[bold]{gib(memory.total)}[/bold]", "")
        console.print(table)
        for note in memory.notes:
            console.print(f"  note: {note}", highlight=False)
        if gpu_memory:
            verdict = ("[green]fits[/green]" if memory.fits else "[red]does not fit[/red]")
            console.print(f"  {verdict}: {gib(memory.total)} of {gib(memory.budget)} usable "
                          f"({USABLE_FRACTION:.0%} of {gib(gpu_memory)})", highlight=False)
            for item in memory.advice:
                console.print(f"  would fit with: {item}", highlight=False)
    return all(m.fits for m in memories)
