"""``--check``: the resolved plan, printed before anything expensive happens."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .plan import JobPlan


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
        if plan.teacher is not None:
            kept = (f", {_millions(plan.teacher_params_kept)} kept after pruning"
                    if plan.pruned_teacher else "")
            table.add_row("teacher", f"{plan.teacher.arch} {plan.teacher.kwargs or ''} "
                          f"({_millions(plan.teacher_params)} params{kept}); weights "
                          f"{plan.teacher.weights}")
            table.add_row("teacher taps", ", ".join(plan.teacher_taps) or "-")
            if plan.pruned_teacher:
                table.add_row("teacher pruned", compact(plan.pruned_teacher))
        init = plan.student_init or "random init"
        table.add_row("student", f"{plan.student.arch} {plan.student.kwargs or ''} "
                      f"({_millions(plan.student_params)} params, heads "
                      f"{_millions(plan.head_params)}); from {init}")
        table.add_row("student taps", ", ".join(plan.student_taps) or "-")
        if plan.frozen_student:
            table.add_row("student frozen", compact(plan.frozen_student) +
                          " (no objective reaches them)")
        table.add_row("objectives", "; ".join(
            f"{o.label} x {o.weight}" for o in stage.objectives))
        data, opt = stage.data, stage.optimisation
        table.add_row("batch", f"{data.micro_batch_size} per rank x {plan.world_size} ranks x "
                      f"{opt.gradient_accumulation_steps} accumulation = {plan.global_batch}")
        budget = f"{opt.steps} steps" if opt.steps else f"{opt.epochs} epochs"
        warmup = (f"{opt.warmup_epochs} epochs" if opt.warmup_epochs is not None
                  else f"{opt.warmup_steps} steps")
        table.add_row("optimisation", f"{opt.optimizer}, lr {plan.lr:.3g} ({opt.schedule}, "
                      f"{warmup} warm-up), {budget}, wd {opt.weight_decay}, "
                      f"clip {opt.grad_clip}")
        table.add_row("data", f"train {data.train}; eval {data.eval}; "
                      f"{data.views.geometry.size}px views {list(data.views.views)}")
        table.add_row("deepspeed", f"teacher {stage.deepspeed.teacher_config}, "
                      f"student {stage.deepspeed.student_config}")
        console.print(table)
