"""Shared helpers for the tests: the tiny models, running the real entry point in this
process or on 1 or 2 DeepSpeed ranks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from distill_engine.cli.main import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# The tiny ViT of the spec tests: 32 px, 16 tokens of width 32, 2 blocks (timm builds it in
# milliseconds, also on the meta device).
TINY_VIT_ARCH = "timm:vit_tiny_patch16_224"
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "num_classes": 10}

# A teacher/student pair of tiny ViTs for the 24 px digits shards (FD on 2 CPU ranks in seconds).
DIGITS_TEACHER = {"img_size": 24, "patch_size": 4, "embed_dim": 64, "depth": 3, "num_heads": 2,
                  "num_classes": 10}
DIGITS_STUDENT = {"img_size": 24, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                  "num_classes": 10}

# Tests written for the ZeRO-3 engines (a sharded teacher, a partitioned student) name them,
# since the default placement, auto, would replicate such tiny models.
ZERO3_CONFIGS = {"teacher_config": str(ROOT / "ds_configs" / "teacher_zero3_inference.json"),
                 "student_config": str(ROOT / "ds_configs" / "student_zero3.json")}


FD_NORM = {"kind": "feature", "student_tap": "norm", "teacher_tap": "norm"}


def digits_teacher(weights: Path) -> dict:
    """The digits FD teacher (``DIGITS_TEACHER``) loaded from ``weights``, in fp32."""
    return {"arch": TINY_VIT_ARCH, "kwargs": dict(DIGITS_TEACHER), "weights": str(weights),
            "dtype": "fp32"}


def digits_student(**fields) -> dict:
    return {"arch": TINY_VIT_ARCH, "kwargs": dict(DIGITS_STUDENT), "dtype": "fp32", **fields}


def digits_fd_job(run_dir: Path, train: Path, teacher_weights: Path, steps: int,
                  stage: dict | None = None, **sections) -> dict:
    """The digits Feature Distillation job that the distributed tests share: the digits
    teacher into the digits student at 24 px, final norm to final norm, fp32, batch 16 per
    rank. ``sections`` are merged into the job (a dict key by key), ``stage`` into its one
    stage ``fd``."""
    job = {"name": "fd-test", "run_dir": str(run_dir), "seed": 3,
           "data": {"train": str(train), "micro_batch_size": 16, "num_workers": 1,
                    "views": {"geometry": {"size": 24}}},
           "optimisation": {"lr": 3e-3, "warmup_steps": 1, "steps": steps},
           "logging": {"every_steps": 1},
           "stages": [_merged({"name": "fd", "teacher": digits_teacher(teacher_weights),
                               "student": digits_student(), "objectives": [dict(FD_NORM)]},
                              stage or {})]}
    return _merged(job, sections)


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    environment["DS_ACCELERATOR"] = "cpu"
    environment["PYTHONUNBUFFERED"] = "1"
    environment["OMP_NUM_THREADS"] = "1"
    # Launched ranks run launch/run.py, whose sys.path[0] is launch/: put this checkout first,
    # so that they import the code under test and not whatever the venv has installed.
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return environment


def check_in_process(spec: Path, *extra: str, world_size: int = 2) -> tuple[int, str, str]:
    """``launch/run.py --check`` through ``distill_engine.cli.main`` in this process (the
    command line's own code path, without a fresh interpreter's start-up)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["--spec", str(spec), "--check", "--world-size", str(world_size), *extra])
    return code, out.getvalue(), err.getvalue()


def run_check(spec: Path, *extra: str, world_size: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--spec", str(spec),
                           "--check", "--world-size", str(world_size), *extra],
                          capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)


# Linux carries a process's resident high-water mark across exec, and a fork starts at its
# parent's resident size: a command that pytest (gigabytes by then) starts directly would
# report pytest's memory as its own. So the command is forked by a bare interpreter (a few
# MB), which reaps it and writes its peak to the file named first.
PEAK_OF_COMMAND = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as peak:
    peak.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):  # end the same way
    if os.WTERMSIG(status) == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args: list[str], timeout: int = 300,
                 stdin: str = "") -> tuple[int, str, str, int]:
    """Runs a command; returns its exit code, stdout, stderr and the peak resident memory
    (bytes) of that process alone (``PEAK_OF_COMMAND`` measures it).
    ``stdin``: what the command reads there (a question asked on stdin gets this answer)."""
    import signal
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryFile("w+") as answers, tempfile.TemporaryDirectory() as work:
        answers.write(stdin)
        answers.seek(0)
        peak = Path(work) / "peak_kib"
        # Its own session: a timeout kills the bare interpreter and the command together.
        child = subprocess.Popen([sys.executable, "-S", "-c", PEAK_OF_COMMAND, str(peak), *args],
                                 stdin=answers, stdout=out, stderr=err, text=True, cwd=ROOT,
                                 env=env(), start_new_session=True)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        out.seek(0)
        err.seek(0)
        peak_kib = int(peak.read_text()) if peak.exists() else 0  # kB on Linux
        return child.returncode, out.read(), err.read(), peak_kib * 1024


def run_check_measured(spec: Path, *extra: str, world_size: int = 2,
                       timeout: int = 300, stdin: str = "") -> tuple[int, str, str, int]:
    """``run_check`` with the peak memory of the --check process (``run_measured``)."""
    return run_measured([sys.executable, str(ROOT / "launch" / "run.py"), "--spec", str(spec),
                         "--check", "--world-size", str(world_size), *extra], timeout, stdin)


def launcher(extra_env: dict[str, str] | None) -> Path:
    """``launch/run.py``, or with DISTILL_FAULT the test-only launcher that injects it."""
    if "DISTILL_FAULT" in (extra_env or {}):
        return ROOT / "tests" / "faults.py"
    return ROOT / "launch" / "run.py"


def run_deepspeed(spec: Path, *extra: str, ranks: int = 2, timeout: int = 600,
                  script: Path | None = None,
                  extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N launch/run.py --spec SPEC``: real ranks, gloo, CPU."""
    port = free_port()
    script = script or launcher(extra_env)
    args = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
            str(script), "--spec", str(spec), *extra]
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                              env={**env(), **(extra_env or {})}, timeout=timeout)
    finally:
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)


class StartedJob:
    """A ``deepspeed`` launch running in its own session (process group), so that a test
    can signal it as a cluster would and then look for processes left behind."""

    def __init__(self, spec: Path, *extra: str, ranks: int = 2, log: Path,
                 extra_env: dict[str, str] | None = None, single_process: bool = False):
        self.port = free_port()
        self.log = log
        if single_process:
            args = [sys.executable, str(ROOT / "launch" / "run.py"), "--spec", str(spec), *extra]
        else:
            args = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                    str(self.port), str(launcher(extra_env)), "--spec", str(spec), *extra]
        with open(log, "w") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env={**env(), **(extra_env or {})},
                                            start_new_session=True)
        self.session = self.process.pid  # session and process group id

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal_group(self, signum: int) -> None:
        os.killpg(self.session, signum)

    def left_behind(self) -> list[str]:
        """Processes of the job's session still alive (none once it has ended)."""
        import psutil
        alive = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getsid(proc.pid) == self.session:
                    alive.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:120]}")
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return alive

    def wait_for(self, text: str, timeout: float = 300) -> None:
        """Until ``text`` appears in the output (the job is past its start-up)."""
        import time
        deadline = time.time() + timeout
        while text not in self.output:
            if self.process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"{text!r} never appeared:\n{self.output[-3000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float = 300) -> tuple[int, float, list[str]]:
        """(exit code of the launched command, seconds until the whole session had ended,
        processes still alive ``timeout`` seconds on: orphans)."""
        import time
        started = time.time()
        code = self.process.wait(timeout=timeout)
        while self.left_behind() and time.time() < started + timeout:
            time.sleep(0.2)
        return code, time.time() - started, self.left_behind()

    def clean_up(self) -> None:
        """Kills whatever of the session is left (so a failing test leaves nothing running)."""
        import signal
        try:
            os.killpg(self.session, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{self.port}_*"):
            leftover.unlink(missing_ok=True)


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sparse_safetensors(path: Path, arch: str, **kwargs) -> Path:
    """A real safetensors file for a timm architecture whose tensor bytes are a hole in the
    file: the header (names, dtypes, shapes) is genuine, the data costs no disk and no time.
    Paper-scale recipes can then be checked without their multi-GB weights."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, **kwargs)
    return sparse_safetensors_of(path, model)


def sparse_safetensors_of(path: Path, model) -> Path:
    """``sparse_safetensors`` for any model (built on the meta device): its state dict's
    names and shapes, no data."""
    import json
    import struct

    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        out.truncate(8 + len(encoded) + offset)
    return path


def pack_digits(out: Path, *options: str) -> Path:
    """The digits shards, packed by the command a user runs (the session's ``digits``
    fixture in conftest.py packs them once for every test)."""
    subprocess.run([sys.executable, "-m", "data_shards", "pack", "sklearn:digits", "--out",
                    str(out), *options], check=True, capture_output=True, cwd=ROOT, env=env())
    return out


# ---------------------------------------------------------------------------- text

TEXT_WORDS = {
    0: ["awful", "boring", "dull", "bad", "worst", "sad", "poor", "weak"],
    1: ["table", "chair", "report", "monday", "paper", "window", "street", "number"],
    2: ["great", "lovely", "superb", "good", "best", "happy", "fine", "brilliant"],
}
FILLER = ["the", "a", "film", "was", "it", "is", "this", "and", "very", "so", "of", "plot"]


def tiny_text_jsonl(path: Path, count: int, seed: int, labelled: bool = True) -> Path:
    """Short sentences whose class (0 negative, 1 neutral, 2 positive) follows from the
    words they contain: a task a two-layer BERT learns in a few dozen steps."""
    import json
    import random
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            label = rng.randrange(3)
            words = rng.choices(FILLER, k=rng.randint(3, 9)) + rng.choices(TEXT_WORDS[label], k=2)
            rng.shuffle(words)
            record = {"text": " ".join(words)}
            if labelled:
                record["label"] = ["negative", "neutral", "positive"][label]
            out.write(json.dumps(record) + "\n")
    return path


def tiny_text_splits(data: Path, splits: dict[str, tuple[int, int, bool]],
                     samples_per_shard: int = 200) -> Path:
    """Packs one shard folder per split, ``{name: (count, seed, labelled)}``, under ``data``
    (each from ``tiny_text_jsonl``, kept beside it as NAME.jsonl)."""
    from data_shards import pack
    data.mkdir(parents=True, exist_ok=True)
    for name, (count, seed, labelled) in splits.items():
        tiny_text_jsonl(data / f"{name}.jsonl", count, seed, labelled)
        pack(str(data / f"{name}.jsonl"), data / name, max_samples_per_shard=samples_per_shard,
             workers=1, progress=False)
    return data


def tiny_tokenizer(directory: Path, extra_words: list[str] = ()) -> Path:
    """A BERT-style fast tokenizer ([CLS] text [SEP], [PAD] 0, [MASK]) over the tiny text's
    words, saved with save_pretrained: what a tokenizer directory in a spec holds."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for ws in TEXT_WORDS.values() for w in ws} | set(FILLER) | set(extra_words))
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]",
                            mask_token="[MASK]").save_pretrained(directory)
    return directory


# A 2-layer, 32-wide BERT (text self-distillation tests)
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}


def script_module(name: str):
    """scripts/NAME.py as a module (the scripts are not a package). scripts/ goes on sys.path,
    as it is for `python scripts/NAME.py`, for the modules the scripts share."""
    import importlib.util
    if str(ROOT / "scripts") not in sys.path:
        sys.path.append(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_stage_accuracies(run: Path, accuracies: dict[str, float]) -> None:
    """RUN/STAGE/export/metrics.json with each stage's held-out accuracy, as a finished
    stage's export leaves it (what the recipes' results scripts read)."""
    for stage, accuracy in accuracies.items():
        (run / stage / "export").mkdir(parents=True)
        (run / stage / "export" / "metrics.json").write_text(json.dumps({"accuracy": accuracy}))


def bert_encoder_dir(directory: Path, vocab_size: int, **config) -> Path:
    """A BertModel save (encoder and pooler, no head), as MiniLM ships."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(3)
    BertModel(BertConfig(vocab_size=vocab_size, **TINY_BERT, **config)).save_pretrained(directory)
    return directory
