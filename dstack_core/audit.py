"""The audit log: one JSON line per audited event, chained by SHA-256 hashes.

Format (docs/security.md has the field reference). Each line is one record, a JSON object
in canonical form: keys sorted, no whitespace (``","`` and ``":"`` separators), ASCII only
(``\\uXXXX`` escapes), integers and strings only as numbers, no NaN, then ``"\\n"``.
Every record carries:

* ``v``: the format version (1); ``seq``: 1, 2, 3, ... across the whole file;
* ``prev``: the ``hash`` of the record before it (64 zeros for the first);
* ``hash``: SHA-256 (hex) of the canonical serialisation of the record *without* its
  ``hash`` key. The line is the canonical serialisation *with* it.

So an edited record no longer matches its own hash; one edited and re-hashed no longer
matches the next record's ``prev``; a dropped record leaves a gap in ``seq`` and a broken
link; reordered records run ``seq`` backwards. A chain can be rewritten whole by whoever
may write the file: :func:`verify_audit_log` can check that a record hash recorded
elsewhere (an *anchor*) is still in the chain.

Appends are durable before they are acknowledged (``write`` + ``fdatasync``); concurrent
appends are grouped into one write and one sync. A failed write is cut off again, so the
file never holds a partial record in its middle, and the next append retries. A crash can
leave at most a torn last line, which :meth:`AuditLog.open` removes (and the next start
record reports); :func:`verify_audit_log` reports it as torn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from . import strictjson
from .errors import AuditUnavailable, ConfigurationError

__all__ = [
    "FORMAT_VERSION",
    "GENESIS",
    "AuditLog",
    "Problem",
    "Verification",
    "canonical_json",
    "record_hash",
    "verify_audit_log",
]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
GENESIS: Final = "0" * 64
"""The ``prev`` of the first record of a file."""
CHAIN_KEYS: Final = frozenset({"v", "seq", "prev", "hash"})
FILE_MODE: Final = 0o600
_TAIL_CHUNK: Final = 64 * 1024
_HASH_RE: Final = re.compile(r"[0-9a-f]{64}")

ProblemKind = Literal["torn", "invalid", "edited", "dropped", "reordered"]


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    """The canonical serialisation: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical serialisation of ``record`` without ``hash``."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _chain_error(record: Any) -> str | None:
    """Why ``record`` is not a well-formed record of this format, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("v") != FORMAT_VERSION:
        return f"unknown format version {record.get('v')!r}"
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "no valid seq"
    for key in ("prev", "hash"):
        if not isinstance(record.get(key), str) or not _HASH_RE.fullmatch(record[key]):
            return f"no valid {key}"
    return None


def _parse_line(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """``(record, "")`` for a well-formed canonical line, else ``(None, why)``."""
    try:
        record = strictjson.loads(line)
    except ValueError:
        return None, "not JSON"
    why = _chain_error(record)
    if why is not None:
        return None, why
    if canonical_json(record) != line:
        return None, "not in canonical form"
    return record, ""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _rfind_newline(fd: int, end: int) -> int:
    """The offset of the last ``\\n`` before ``end``, or -1."""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found
        end = start
    return -1


class AuditLog:
    """An open audit log, appended to by :meth:`append`. Build with :meth:`open`."""

    def __init__(self, path: Path, fd: int, *, size: int, seq: int, head: str) -> None:
        self.path = path
        self._fd = fd
        self._size = size
        self._seq = seq
        self._head = head
        self._dirty = False
        self._queue: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def head(self) -> str:
        """The hash of the last durable record (:data:`GENESIS` for an empty log)."""
        return self._head

    @classmethod
    def open(cls, path: Path) -> tuple[AuditLog, int]:
        """Open (or create, mode 0600, and its directory) the log at ``path``; cut off a
        torn last line.

        Blocking. The chain continues from the last complete record, which must be intact.

        :returns: the log and the number of torn bytes removed (0 normally).
        :raises ConfigurationError: the file cannot be opened, or its last complete record
            is not an intact record of this format (it is never overwritten).
        """
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise ConfigurationError(f"cannot open audit log {path}: {exc.strerror}") from None
        try:
            if created:
                _fsync_dir(path.parent)
            size = os.fstat(fd).st_size
            last_newline = _rfind_newline(fd, size)
            torn = size - (last_newline + 1)
            if torn:
                os.ftruncate(fd, last_newline + 1)
                os.fsync(fd)
                size = last_newline + 1
                log.warning("audit log %s: removed a torn last line (%d bytes) left by a crash",
                            path, torn)
            seq, head = 0, GENESIS
            if size:
                start = _rfind_newline(fd, size - 1) + 1
                record, why = _parse_line(os.pread(fd, size - 1 - start, start))
                if record is None or record_hash(record) != record["hash"]:
                    raise ConfigurationError(
                        f"audit log {path}: the last record is not intact "
                        f"({why or 'its hash does not match'}); check the file with "
                        f"'dstack-agent audit verify {path}' and move it away to start a new log"
                    )
                seq, head = record["seq"], record["hash"]
        except OSError as exc:
            os.close(fd)
            raise ConfigurationError(f"cannot use audit log {path}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size=size, seq=seq, head=head), torn

    def _write_batch(self, entries: list[dict[str, Any]]) -> None:
        """Chain, write and sync ``entries``; on failure the file is cut back (blocking)."""
        if self._dirty:
            os.ftruncate(self._fd, self._size)
            self._dirty = False
        seq, head = self._seq, self._head
        lines = []
        for entry in entries:
            seq += 1
            record = {**entry, "v": FORMAT_VERSION, "seq": seq, "prev": head}
            head = record_hash(record)
            record["hash"] = head
            lines.append(canonical_json(record) + b"\n")
        data = b"".join(lines)
        try:
            _write_all(self._fd, data)
            os.fdatasync(self._fd)
        except OSError:
            self._dirty = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
                self._dirty = False
            raise
        self._size += len(data)
        self._seq, self._head = seq, head

    def append_sync(self, entry: Mapping[str, Any]) -> None:
        """Append one record durably, blocking (start-up, before serving).

        :raises AuditUnavailable: it could not be written (nothing of it stays in the file).
        """
        try:
            self._write_batch([dict(entry)])
        except OSError as exc:
            raise self._failed(exc) from None
        self._recovered()

    def _failed(self, exc: OSError) -> AuditUnavailable:
        """Log a write failure once per incident; the error to refuse callers with."""
        if not self._failing:
            log.error("audit log %s cannot be written (%s); audited calls are refused with "
                      "503 audit_unavailable until it can", self.path, exc.strerror)
        self._failing = True
        return AuditUnavailable("the audit log cannot be written; the call was not made")

    def _recovered(self) -> None:
        if self._failing:
            log.warning("audit log %s is writable again", self.path)
        self._failing = False

    async def append(self, entry: Mapping[str, Any]) -> None:
        """Append ``entry`` (without the chain keys) as the next record, durably.

        Returns once the record is synced. Records appended while a sync runs are written
        together by the next one.

        :raises AuditUnavailable: the record could not be written.
        """
        if CHAIN_KEYS & entry.keys():
            raise ValueError(f"audit entries must not set {sorted(CHAIN_KEYS & entry.keys())}")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((dict(entry), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await asyncio.to_thread(self._write_batch, [entry for entry, _ in batch])
            except OSError as exc:
                error = self._failed(exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                self._recovered()
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def close(self) -> None:
        """Finish pending appends and close the file."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
        os.close(self._fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.frozen(kw_only=True)
class Problem:
    """The first thing wrong with a log: its kind, 1-based line and a message naming it."""

    kind: ProblemKind
    line: int
    message: str


@attrs.frozen(kw_only=True)
class Verification:
    """What :func:`verify_audit_log` found: ``records`` intact records before any
    ``problem``, the ``head`` hash of the last of them, whether ``anchor_found``."""

    records: int
    head: str
    problem: Problem | None = None
    anchor_found: bool | None = None

    @property
    def intact(self) -> bool:
        """No problem, and the anchor (if one was asked for) is in the chain."""
        return self.problem is None and self.anchor_found is not False


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from f


def _seq_of(line: bytes) -> int | None:
    record, _ = _parse_line(line.rstrip(b"\n"))
    return None if record is None else int(record["seq"])


def _gap(line: int, expected: int, seq: int, later: Mapping[int, int]) -> Problem:
    if later.get(expected, 0) > 0:
        return Problem(kind="reordered", line=line,
                       message=f"line {line} (record {seq}) is out of order: record {expected} "
                               "comes later in the file")
    missing = f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
    return Problem(kind="dropped", line=line,
                   message=f"{missing} dropped before line {line} (record {seq})")


def verify_audit_log(path: Path, *, anchor: str | None = None) -> Verification:
    """Check the whole chain of the log at ``path``; report the first broken record.

    :param anchor: a record hash recorded earlier; the log is only intact if its chain
        still contains that record.
    :raises OSError: the file cannot be read.
    """
    seqs = [_seq_of(raw) for raw in _lines(path)]
    later: dict[int, int] = {}
    for seq in seqs:
        if seq is not None:
            later[seq] = later.get(seq, 0) + 1
    head, count, found = GENESIS, 0, None if anchor is None else False
    expected = 1
    for number, raw in enumerate(_lines(path), start=1):
        seq = seqs[number - 1]
        if seq is not None:
            later[seq] -= 1
        problem = _check_line(number, raw, head, expected, later)
        if problem is not None:
            return Verification(records=count, head=head, problem=problem, anchor_found=found)
        record, _ = _parse_line(raw[:-1])
        assert record is not None
        head, count, expected = record["hash"], count + 1, record["seq"] + 1
        if anchor is not None and head == anchor:
            found = True
    return Verification(records=count, head=head, anchor_found=found)


def _check_line(
    number: int, raw: bytes, head: str, expected: int, later: Mapping[int, int]
) -> Problem | None:
    """The problem with line ``number`` given the chain so far; ``later`` counts the seqs
    of the lines after it."""
    if not raw.endswith(b"\n"):
        return Problem(kind="torn", line=number,
                       message=f"line {number} is a torn last record (an incomplete write, e.g. "
                               "a crash); the agent removes it when it next starts")
    record, why = _parse_line(raw[:-1])
    if record is None:
        return Problem(kind="invalid", line=number,
                       message=f"line {number} is not a valid audit record ({why}): edited or "
                               "corrupted")
    seq = record["seq"]
    if record_hash(record) != record["hash"]:
        return Problem(kind="edited", line=number,
                       message=f"line {number} (record {seq}) was edited: its contents do not "
                               "match its hash")
    if seq > expected:
        return _gap(number, expected, seq, later)
    if seq < expected:
        return Problem(kind="reordered", line=number,
                       message=f"line {number} (record {seq}) is out of order or repeated: "
                               f"record {expected} was expected")
    if record["prev"] != head:
        if number == 1:
            return Problem(kind="edited", line=1,
                           message="line 1 (record 1) was edited: it does not start the chain")
        return Problem(kind="edited", line=number - 1,
                       message=f"line {number - 1} (record {expected - 1}) was edited and "
                               f"re-hashed: line {number} links to a different record")
    return None
