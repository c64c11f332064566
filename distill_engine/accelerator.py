"""Facts about the device this process trains on: bf16, torch's fused AdamW kernel, its
name. DeepSpeed chooses the accelerator; it is imported only when a fact is asked for."""

from __future__ import annotations

import torch

# Devices with torch's fused AdamW kernel: one pass over each tensor instead of a dozen
# foreach kernels, the same update up to rounding (what it saves: BENCHMARKS.md, "Engine
# overhead"). DeepSpeed's own FusedAdam is a CUDA op it would have to build.
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "hpu")


def accelerator_has_bf16() -> bool:
    from deepspeed.accelerator import get_accelerator
    try:
        return bool(get_accelerator().is_bf16_supported())
    except Exception:
        return False


def resolve_dtype(choice: str) -> torch.dtype:
    if choice == "bf16" or (choice == "auto" and accelerator_has_bf16()):
        return torch.bfloat16
    return torch.float32


def fused_adamw_available() -> bool:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name().split(":")[0] in FUSED_ADAMW_DEVICES


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())
