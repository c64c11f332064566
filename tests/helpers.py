"""Shared helpers for the tests: the tiny models, running the real entry point in this
process or on 1 or 2 DeepSpeed ranks."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from distill_engine.cli import main as cli_main

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


def run_deepspeed(spec: Path, *extra: str, ranks: int = 2, timeout: int = 600,
                  script: Path | None = None,
                  extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N launch/run.py --spec SPEC``: real ranks, gloo, CPU."""
    port = free_port()
    script = script or ROOT / "launch" / "run.py"
    args = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
            str(script), "--spec", str(spec), *extra]
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                              env={**env(), **(extra_env or {})}, timeout=timeout)
    finally:
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
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
