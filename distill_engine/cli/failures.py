"""How a failure while training ends the job: one table from the exception's type to its
exit code and to who reports it. Anything not in the table is a bug and keeps its
traceback. (A bad spec never gets this far: ``main`` exits 2 before any rank starts.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from data_shards import DataError
from distill_engine.training.checkpoints import CheckpointError
from distill_engine.training.trainer import NonFiniteLoss
from distill_engine.weights import WeightsError


@dataclass(frozen=True)
class Failure:
    exit_code: int
    message: str
    every_rank: bool  # every rank reached this verdict together: rank 0 alone reports it


# type -> (exit code, every rank?). A verdict on shared state (a loss averaged over ranks)
# is reported once; a failure of one rank's data, disk or weights by the rank it hit,
# unless the error itself says that every rank hit it (``every_rank``).
FAILURES: dict[type[Exception], tuple[int, bool | None]] = {
    NonFiniteLoss: (1, True),
    WeightsError: (1, None),
    DataError: (1, None),
    CheckpointError: (1, None),
}


def failure_of(err: BaseException) -> Failure | None:
    """The exit code and message of a failure while training, or None for a bug."""
    for error_type, (exit_code, every_rank) in FAILURES.items():
        if isinstance(err, error_type):
            if every_rank is None:
                every_rank = bool(getattr(err, "every_rank", False))
            return Failure(exit_code, str(err), every_rank)
    if lost_peer(err):
        return Failure(1, f"lost contact with another rank ({str(err).splitlines()[0]}): it "
                          f"died or stopped answering for deepspeed.timeout_s. Run the same "
                          f"command again to resume from the newest complete checkpoint", False)
    return None


def lost_peer(err: BaseException) -> bool:
    """A collective that failed because another rank died or stopped answering. Gloo raises
    plain RuntimeErrors for timeouts and closed connections, with no type of their own:
    for those, its messages are the only sign."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("Timed out waiting", "Connection closed by peer",
                                "Connection reset by peer")))
