"""Opening shard URLs and reading tar members safely.

Reading goes through webdataset's own tar iterator and key grouping; this module adds what a
training job needs on top: member names are checked (absolute paths and '..' are refused),
`pipe:` URLs must be opted into (they run shell commands), a member larger than
`max_member_bytes` is skipped unread (a gzip-compressed shard can hold gigabytes of zeros in a
few kB), and every failure is reported as a ShardError that names the shard URL and the sample
key it happened at.
"""

import logging
import re
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath

import webdataset as wds
from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix

from .errors import DataError

log = logging.getLogger("data_shards")


class ShardError(DataError):
    """A shard that could not be opened or read to its end; `key` is the sample it broke at."""

    def __init__(self, url: str, key: str | None, reason: str):
        self.url, self.key, self.reason = url, key, reason
        where = f" at sample '{key}'" if key else ""
        super().__init__(f"Shard {url}{where}: {reason}")


def check_member_name(name: str) -> str:
    """Refuse tar members that would escape a directory if the tar were ever extracted."""
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or ".." in name.split("\\"):
        raise _UnsafeMember(name)
    return name


class _UnsafeMember(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def check_url_allowed(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise DataError(
            f"Shard URL '{url}' is a pipe: command, which runs a shell command; pass allow_pipe=True "
            "(ShardStream/EvalStream) or --allow-pipe (CLI) if you trust it."
        )


def open_url(url: str):
    """Local paths with plain open(); everything else (pipe:, http(s), gs, s3 via pipe, ...) with wds.gopen."""
    if "://" not in url and not url.startswith("pipe:"):
        return open(url.removeprefix("file:"), "rb")
    if url.startswith("pipe:"):  # allowed by check_url_allowed; say what it runs, every time
        log.info("running the shell command of a pipe: shard url: %s", url.removeprefix("pipe:"))
    return wds.gopen(url)


# The largest field one sample may have. Encoded images are a few MB (a 50-megapixel JPEG is
# about 20 MB); anything past this is a broken or hostile shard, not a sample.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
SKIP_META = r"__[^/]*__($|/)"  # webdataset's default: metadata members, not sample fields


def read_shard(url: str, allow_pipe: bool = False,
               max_member_bytes: int | None = None) -> Iterator[dict]:
    """Yield the samples of one shard as dicts of raw bytes plus __key__ and __url__.

    A member over `max_member_bytes` (default MAX_MEMBER_BYTES) is skipped without being read into memory (the tar
    stream discards it block by block); its field holds an `Oversized` instead of bytes, which
    the decoder refuses, so it is counted as a bad sample naming its shard and key.
    Raises ShardError at the first problem (cannot open, truncated or corrupt tar, unsafe member);
    the samples before it have been yielded.
    """
    check_url_allowed(url, allow_pipe)
    try:
        stream = open_url(url)
    except Exception as exn:
        raise ShardError(url, None, f"cannot be opened ({type(exn).__name__}: {exn})") from None
    last_key = None
    reader = _EndCheckingReader(stream)
    try:
        with stream:
            members = _tar_members(reader, max_member_bytes or MAX_MEMBER_BYTES)
            for sample in group_by_keys({**member, "__url__": url} for member in members):
                last_key = sample["__key__"]
                yield sample
            reader.check_complete()
    except _UnsafeMember as exn:
        raise ShardError(url, None, f"refused: tar member '{exn.name}' has an absolute path or '..'") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exn:
        # The sample being read when the tar broke is the one after the last complete one.
        after = f" after sample '{last_key}'" if last_key else ""
        detail = str(exn).split(" @ <")[0]  # drop the file-object repr webdataset appends
        raise ShardError(url, None, f"is truncated or corrupt{after} ({type(exn).__name__}: {detail})") from None


class Oversized:
    """Stands for a member skipped unread because it is larger than `max_member_bytes`."""

    def __init__(self, name: str, size: int, limit: int):
        self.name, self.size, self.limit = name, size, limit

    def __str__(self) -> str:
        return f"member '{self.name}' is {self.size:,} bytes, more than the {self.limit:,} a sample field may have"


def _tar_members(fileobj, max_member_bytes: int) -> Iterator[dict]:
    """webdataset's tar_file_iterator, checking member names, and reading a member only
    when its header says it fits (its size is known before any of its bytes are read)."""
    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    for tarinfo in stream:
        name = tarinfo.name
        if not tarinfo.isreg() or name is None or re.match(SKIP_META, name) or (
                "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
            continue
        name = check_member_name(name)
        if tarinfo.size > max_member_bytes:
            yield {"fname": name, "data": Oversized(name, tarinfo.size, max_member_bytes)}
        else:
            yield {"fname": name, "data": stream.extractfile(tarinfo).read()}
        stream.members = []  # what tarfile keeps for random access: nothing, in a stream


class _EndCheckingReader:
    """Counts and keeps the tail of what tarfile reads, to tell a complete tar from a truncated one.

    Python's tarfile treats a tar cut at a member boundary as ended, so a truncation would pass
    unnoticed; a complete tar ends with two zero blocks and is a whole number of 512-byte blocks.
    """

    def __init__(self, stream):
        self.stream, self.size, self.tail = stream, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.size += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def check_complete(self) -> None:
        while self.read(1 << 16):  # the end-of-archive blocks tarfile did not need to read
            pass
        if self.size % 512 or self.tail.count(0) != 1024:
            raise tarfile.ReadError(f"no end-of-archive marker after {self.size} bytes")
