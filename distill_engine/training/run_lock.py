"""One job per run directory.

Two launches on one ``run_dir`` would resume from each other's checkpoints and write the
same tags, exports and metrics. Rank 0 therefore holds ``RUN_DIR/.lock`` for the job's
life: an exclusive ``flock`` on the file, which the kernel (and NFS's lock manager) drops
when the holder dies, however it dies. The file also says who holds it (host, pid, start
time, command), for the message a second launch prints.

A lock file with a holder written in it but no lock held is what a job that was killed
leaves behind: it is taken over, with a note naming the job that left it. A job that ends
normally empties the file.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("distill_engine")

LOCK_FILE = ".lock"


class RunDirInUse(Exception):
    """Another live job holds the run directory."""


class RunDirUnusable(Exception):
    """The run directory cannot be made or written (what --check could not tell)."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = None

    def acquire(self) -> str | None:
        """Takes the lock or raises ``RunDirInUse`` naming the holder. Returns a note when a
        lock left by a dead job was taken over."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as err:
            raise RunDirUnusable(
                f"run_dir {self.path.parent} cannot be made or written ({err.strerror or err}"
                f"{': ' + err.filename if err.filename else ''}); nothing was written. Name a "
                f"run_dir on a disk this job can write") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise  # a file system without flock: say so rather than run unguarded
            holder = self._holder()
            self.file.close()
            self.file = None
            raise RunDirInUse(
                f"run directory {self.path.parent} is in use by another job: "
                f"{describe(holder)}. Two jobs on one run directory would resume from and "
                f"overwrite each other's checkpoints; wait for that job to end, stop it, or "
                f"give this job another run_dir") from None
        left_behind = self._holder()
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}))
        self.file.flush()
        os.fsync(self.file.fileno())
        if left_behind:
            return (f"took over the lock on {self.path.parent} left by a job that is no longer "
                    f"running ({describe(left_behind)})")
        return None

    def _holder(self) -> dict | None:
        try:
            self.file.seek(0)
            text = self.file.read()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return {"unreadable": True}

    def release(self) -> None:
        if self.file is None:
            return
        self.file.seek(0)
        self.file.truncate()  # an empty file: nobody holds it, nothing to take over
        self.file.flush()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None


def describe(holder: dict | None) -> str:
    if not holder or holder.get("unreadable"):
        return "holder unknown (the lock file cannot be read)"
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}, command {holder.get('command')!r}")
