"""Weights into and out of models that ZeRO-3 may have partitioned across ranks.

Under ZeRO-3 a module's parameters exist whole only inside ``GatheredParameters``; both
directions go one module at a time, so that no rank ever holds the whole model twice.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from distill_engine.weights import WeightsError, expected_shapes, shape_problems


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                 ignore: Iterable[str] = (), fresh: Iterable[str] = ()) -> None:
    """Copies ``state`` into ``model``, module by module, also when ZeRO-3 has partitioned it.

    Under ZeRO-3 each module's parameters are gathered, written on rank 0 and
    re-partitioned (``GatheredParameters(modifier_rank=0)``); buffers are not partitioned
    and are written on every rank.
    """
    fresh = set(fresh)
    problem = shape_problems(expected_shapes(model), {k: tuple(v.shape) for k, v in state.items()},
                             path, ignore, fresh)
    if problem:
        raise WeightsError(problem)
    state = {k: v for k, v in state.items() if k not in fresh}
    import deepspeed
    rank = _rank()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = list(module.named_parameters(recurse=False))
        if params:
            partitioned = any(hasattr(p, "ds_id") for _, p in params)
            context = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0)
                       if partitioned else nullcontext())
            with context:
                if rank == 0 or not partitioned:
                    with torch.no_grad():
                        for name, param in params:
                            if prefix + name in state:  # else a fresh head parameter
                                param.copy_(state[prefix + name].to(param.dtype))
        for name, buffer in module.named_buffers(recurse=False):
            if prefix + name in state:
                with torch.no_grad():
                    buffer.copy_(state[prefix + name].to(buffer.dtype))


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full fp32 CPU state dict on rank 0 (empty elsewhere), gathering ZeRO-3 partitions
    one module at a time so that no rank ever holds the whole model twice."""
    import deepspeed
    rank = _rank()
    persistent = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = list(module.named_parameters(recurse=False))
        partitioned = any(hasattr(p, "ds_id") for _, p in params)
        context = (deepspeed.zero.GatheredParameters([p for _, p in params])
                   if partitioned else nullcontext())
        with context:
            if rank == 0:
                for name, tensor in params + list(module.named_buffers(recurse=False)):
                    if prefix + name in persistent:
                        state[prefix + name] = tensor.detach().float().cpu().clone()
    return state
