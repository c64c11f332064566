"""What the benchmarks share: peak memory, one-process DeepSpeed, small FD jobs, medians,
and writing a result into BENCHMARKS.md.

Timings on this shared 2-core machine are noisy, so every speed figure is a ratio against a
baseline measured in the same run, interleaved, median of the repetitions.

The benchmarks run on DeepSpeed's CPU accelerator unless ``DS_ACCELERATOR`` names another
(``bench/gpu_check.sh`` sets ``cuda``); with ``BENCH_REQUIRE_DEVICE`` set they refuse to run
anywhere else rather than time the CPU.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import socket
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def machine() -> str:
    """This machine in a few words, as BENCHMARKS.md names it."""
    cores = os.cpu_count()
    memory = int(_meminfo("MemTotal")) / 1024 ** 2
    if on_cuda():
        import torch
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return (f"{torch.cuda.device_count()} x {', '.join(names)}, {cores} CPU cores, "
                f"{memory:.0f} GiB (CUDA ranks, NCCL)")
    return f"{cores} cores, {memory:.0f} GiB, no GPU (CPU ranks, gloo)"


def _meminfo(field: str) -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1]  # kB
    return "0"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how shared the machine was."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------- device

def on_cuda() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cuda"


def device() -> str:
    """The device the benchmark's tensors go to (DeepSpeed's accelerator, this rank's)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().current_device_name()


def synchronised(step, on: str | None = None):
    """``step`` followed by a wait for the device, so that a host timer sees the whole step
    (on an asynchronous accelerator; the CPU's calls return when their work is done)."""
    import torch
    if not (on or device()).startswith("cuda"):
        return step

    def timed(*args, **kwargs):
        out = step(*args, **kwargs)
        torch.cuda.synchronize()
        return out
    return timed


def require_device() -> None:
    """With ``BENCH_REQUIRE_DEVICE`` (gpu_check.sh): stop unless that device is what runs."""
    wanted = os.environ.get("BENCH_REQUIRE_DEVICE")
    if not wanted:
        return
    import torch
    from deepspeed.accelerator import get_accelerator
    name = get_accelerator().device_name()
    if name != wanted or (wanted == "cuda" and not torch.cuda.is_available()):
        sys.exit(f"benchmark asked to run on {wanted} (BENCH_REQUIRE_DEVICE) but DeepSpeed's "
                 f"accelerator is {name!r} (torch.cuda.is_available() = "
                 f"{torch.cuda.is_available()}); not timing the CPU instead")


# ---------------------------------------------------------------------------- memory

def _status(field: str) -> int:
    """A VmXXX field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss() -> int:
    return _status("VmRSS")


# What a rank holds: the CUDA allocator's live bytes on a GPU, resident memory (with
# EXACT_MALLOC: live tensors) on the CPU.
def held() -> int:
    if on_cuda():
        import torch
        return torch.cuda.memory_allocated()
    return rss()


def peak_held() -> int:
    if on_cuda():
        import torch
        return torch.cuda.max_memory_allocated()
    return peak_rss()


def reset_peak_held() -> None:
    if on_cuda():
        import torch
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()


def peak_rss() -> int:
    """The high-water mark of resident memory (VmHWM) since the last ``reset_peak``."""
    return _status("VmHWM")


def reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux: ``5`` into clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def trim() -> None:
    """Gives freed heap back to the OS, so that the next peak starts from what is live."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


GiB = 1024 ** 3
# glibc keeps freed blocks of up to 32 MiB in its heaps (its mmap threshold rises to the
# largest block freed) and in one arena per thread, so a CPU process's peak RSS varies
# from run to run by hundreds of MiB for the same live tensors (ViT-L's sharded teacher at
# 1 rank: 0.67 to 1.02 GiB). A fixed threshold maps every block of 64 KiB or more on its
# own and unmaps it when freed: peak RSS then follows the live tensors (0.597 GiB, twice).
# A GPU's memory is live tensors plus the caching allocator's slack, not glibc's.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ---------------------------------------------------------------------------- DeepSpeed

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """DeepSpeed's process group: as launched by ``deepspeed``, or this one process alone."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    require_device()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if on_cuda():
        import torch
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # gloo on the CPU, NCCL on CUDA: the accelerator's own backend, as the engine uses.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def remove_shm_buffers() -> None:
    """DeepSpeed's CPU all-reduce leaves a buffer per rank in /dev/shm; remove ours."""
    port = os.environ.get("MASTER_PORT")
    if port:
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)


def launch(script: Path, *args: str, ranks: int = 2, timeout: int = 900,
           exact_memory: bool = False, threads: int | None = None) -> str:
    """``deepspeed --num_gpus N script args``: real ranks (CPU ranks unless DS_ACCELERATOR
    says otherwise); returns stdout. ``exact_memory``: glibc set so that peak RSS follows
    live tensors (for memory figures, not timings: every large block is then a fresh
    mapping). ``threads``: torch threads per rank (OMP_NUM_THREADS)."""
    import subprocess
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": os.environ["DS_ACCELERATOR"], "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
           **(EXACT_MALLOC if exact_memory else {}),
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parents[1] / "torch_extensions"))
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(port), str(script), *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                                timeout=timeout)
    finally:
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


# ---------------------------------------------------------------------------- FD jobs

def fd_job(work: Path, teacher: dict[str, Any], student: dict[str, Any], *, batch: int,
           size: int, dtype: str = "fp32", checkpointing: bool = False,
           arch: str = "timm:vit_tiny_patch16_224", student_arch: str | None = None,
           tap: str = "norm", teacher_tap: str | None = None, world_size: int = 1, teacher_weights: bool = True,
           student_config: str = "auto", teacher_config: str = "auto",
           objectives: list[dict[str, Any]] | None = None):
    """A one-stage FD job and its plan. With ``teacher_weights`` the random teacher is saved
    to ``work`` (the engine loads it); without, the weights path is a placeholder (for
    teachers too large to save here, built with random init by measure_memory.py).
    Configs are ``auto`` (placement chosen from the plan) or paths relative to the repo.
    ``objectives`` replace FD at ``tap``; a job whose objectives need no teacher has none."""
    import timm
    import torch
    import yaml
    from safetensors.torch import save_file

    from distill_engine.planning.load import load_plan
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "teacher.safetensors"
    if teacher_weights and not weights.exists() and teacher is not None:
        torch.manual_seed(0)
        model = timm.create_model(arch.split(":", 1)[1], **teacher)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    (work / "shards").mkdir(exist_ok=True)  # never read: the benchmarks feed fixed batches
    objectives = objectives or [{"kind": "feature", "student_tap": tap,
                                 "teacher_tap": teacher_tap or tap}]
    spec = {
        "name": "bench", "run_dir": str(work / "run"), "seed": 0,
        "data": {"train": str(work / "shards"), "micro_batch_size": batch, "num_workers": 0,
                 "views": {"geometry": {"size": size}}},
        "optimisation": {"lr": 1e-4, "steps": 1000, "warmup_steps": 10, "grad_clip": 3.0},
        "stages": [{
            "name": "fd",
            "teacher": {"arch": arch, "kwargs": teacher, "weights": str(weights), "dtype": dtype},
            "student": {"arch": student_arch or arch, "kwargs": student, "dtype": dtype,
                        "grad_checkpointing": checkpointing},
            "deepspeed": {key: value if value == "auto" else str(ROOT / value) for key, value
                          in (("student_config", student_config),
                              ("teacher_config", teacher_config))},
            "objectives": objectives,
        }],
    }
    if all(o["kind"] == "cross_entropy" for o in objectives):
        del spec["stages"][0]["teacher"]
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_plan(path, world_size=world_size, missing_inputs_ok=not teacher_weights)


# ---------------------------------------------------------------------------- results

def median(values: list[float]) -> float:
    return statistics.median(values)


def median_interval(values: list[float], level: float = 0.95, draws: int = 2000
                    ) -> tuple[float, float]:
    """A bootstrap interval of the median (percentile method, fixed seed): how far the
    median of these repetitions could move on another run of the same length. On a shared
    machine a ratio is only "ahead" or "behind" when its interval says so."""
    import random
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(draws))
    tail = (1 - level) / 2
    return medians[int(tail * draws)], medians[int((1 - tail) * draws) - 1]


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return "python " + " ".join([str(shown), *sys.argv[1:]])


def record(title: str, body: str, command: str | None = None) -> None:
    """Replaces (or appends) the ``## title`` section of BENCHMARKS.md with this result."""
    import torch
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = (f"## {title}\n\nCommand: `{command or command_line()}`\n\n"
               f"Machine: {machine()}; torch {torch.__version__}, Python "
               f"{platform.python_version()}. Date: {datetime.date.today().isoformat()}; load "
               f"average {load_average()} at the end. Speed figures are ratios measured side "
               f"by side in one run (the machine is shared).\n\n{body.strip()}\n\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def fixed_batches(batch: int, size: int, seed: int = 0):
    """The same random image batch forever: the engine, not the data, is measured."""
    import itertools

    import torch
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(batch) % 2  # for objectives that read labels (cross_entropy)
    return itertools.repeat({"image": images, "label": labels})


def engine_trainer(job, plan, batches):
    """A StageTrainer with the real engines (as ``setup`` builds them) fed ``batches``
    instead of a shard stream."""
    from distill_engine.training.trainer import StageTrainer
    trainer = StageTrainer(job, plan)
    trainer.build_engines(total_steps=1000, warmup_steps=0)
    trainer.batches = batches
    return trainer


def measured(stdout: str) -> list[dict[str, Any]]:
    """The ``MEASURED {json}`` lines of measure_memory.py, one per rank, by rank."""
    import json
    import re
    # Ranks print at once: two lines may reach the launcher's stdout run together.
    decoder = json.JSONDecoder()
    rows = [decoder.raw_decode(stdout, m.end())[0] for m in re.finditer(r"MEASURED ", stdout)]
    return sorted(rows, key=lambda r: r["rank"])


def measure_memory(job_file: Path, *, ranks: int = 1, steps: int = 2, teacher_only: bool = False,
                   random_teacher: bool = False, compare_bare: bool = False,
                   exact_memory: bool = True, timeout: int = 900,
                   threads: int | None = None) -> list[dict[str, Any]]:
    args = ["--job", str(job_file), "--steps", str(steps)]
    args += ["--teacher-only"] if teacher_only else []
    args += ["--compare-bare"] if compare_bare else []
    args += ["--random-teacher"] if random_teacher else []
    script = Path(__file__).resolve().parent / "measure_memory.py"
    return measured(launch(script, *args, ranks=ranks, timeout=timeout,
                           exact_memory=exact_memory, threads=threads))
