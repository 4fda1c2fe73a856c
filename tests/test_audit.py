"""The audit log: durable hash-chained appends, crash repair, and tamper detection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from dstack_core.audit import (
    GENESIS,
    AuditLog,
    canonical_json,
    record_hash,
    verify_audit_log,
)
from dstack_core.errors import AuditUnavailable, ConfigurationError

from .conftest import run_cli


def entry(i: int) -> dict[str, object]:
    return {"time": f"t{i}", "event": "call", "method": "GetKey", "args": {"path": f"p/{i}"}}


def write_log(path: Path, count: int) -> list[bytes]:
    """``count`` records appended concurrently (one group commit); the file's lines."""

    async def fill() -> None:
        log, _ = AuditLog.open(path)
        try:
            await asyncio.gather(*(log.append(entry(i)) for i in range(count)))
        finally:
            await log.close()

    asyncio.run(fill())
    return path.read_bytes().splitlines(keepends=True)


def rehash(line: bytes, **changes: object) -> bytes:
    """``line`` with ``changes`` applied and its own hash recomputed (a careful forger)."""
    record = json.loads(line)
    record.update(changes)
    record["hash"] = record_hash(record)
    return canonical_json(record) + b"\n"


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


@pytest.fixture
def lines(log_path: Path) -> list[bytes]:
    return write_log(log_path, 6)


class TestChain:
    def test_records_are_canonical_and_chained(self, log_path: Path, lines: list[bytes]) -> None:
        """Each line is canonical JSON with v, seq 1..n, prev = the previous hash, its own hash."""
        head = GENESIS
        for seq, raw in enumerate(lines, start=1):
            record = json.loads(raw)
            assert canonical_json(record) + b"\n" == raw
            assert (record["v"], record["seq"], record["prev"]) == (1, seq, head)
            body = {k: v for k, v in record.items() if k != "hash"}
            assert record["hash"] == hashlib.sha256(canonical_json(body)).hexdigest()
            head = record["hash"]
        result = verify_audit_log(log_path)
        assert result.intact and (result.records, result.head) == (6, head)

    def test_concurrent_appends_keep_their_order(self, log_path: Path, lines: list[bytes]) -> None:
        """Records appended together are written in the order they were appended."""
        assert [json.loads(raw)["args"]["path"] for raw in lines] == [f"p/{i}" for i in range(6)]

    def test_chain_continues_across_reopen(self, log_path: Path, lines: list[bytes]) -> None:
        """Reopening continues seq and the chain from the last record."""
        more = write_log(log_path, 2)
        assert json.loads(more[6])["seq"] == 7
        assert json.loads(more[6])["prev"] == json.loads(lines[-1])["hash"]
        assert verify_audit_log(log_path).records == 8

    def test_file_mode(self, log_path: Path, lines: list[bytes]) -> None:
        """A new log is created readable and writable by the agent only."""
        assert log_path.stat().st_mode & 0o777 == 0o600

    def test_creates_its_directory(self, tmp_path: Path) -> None:
        """A log in a directory that does not exist yet gets the directory (mode 0700)."""
        write_log(tmp_path / "audit" / "agent.log", 1)
        assert (tmp_path / "audit").stat().st_mode & 0o777 == 0o700
        assert verify_audit_log(tmp_path / "audit" / "agent.log").records == 1

    def test_entries_cannot_forge_chain_keys(self, log_path: Path) -> None:
        """An entry that sets seq, prev, hash or v is a programming error, not a record."""

        async def forge() -> None:
            log, _ = AuditLog.open(log_path)
            try:
                with pytest.raises(ValueError, match="seq"):
                    await log.append({"seq": 1})
            finally:
                await log.close()

        asyncio.run(forge())


class TestTamper:
    def check(self, log_path: Path, lines: list[bytes], kind: str, line: int) -> str:
        log_path.write_bytes(b"".join(lines))
        result = verify_audit_log(log_path)
        assert result.problem is not None, "tampering went unnoticed"
        assert (result.problem.kind, result.problem.line) == (kind, line), result.problem
        cli = run_cli("audit", "verify", str(log_path), check=False)
        assert cli.returncode == (3 if kind == "torn" else 1)
        assert f"line {line}" in cli.stdout and f"line {line}" in cli.stderr
        as_json = json.loads(run_cli("audit", "verify", "--json", str(log_path), check=False).stdout)
        assert as_json["problem"] == {"kind": kind, "line": line, "message": result.problem.message}
        assert as_json["verdict"] == ("torn" if kind == "torn" else "broken")
        return result.problem.message

    def test_intact_cli(self, log_path: Path, lines: list[bytes]) -> None:
        """audit verify exits 0 on an intact log and prints the record count and head."""
        cli = run_cli("audit", "verify", str(log_path))
        assert "intact, 6 records" in cli.stdout and not cli.stderr
        assert json.loads(lines[-1])["hash"] in cli.stdout
        as_json = json.loads(run_cli("audit", "verify", "--json", str(log_path)).stdout)
        assert as_json == {"verdict": "intact", "records": 6, "problem": None,
                           "head": json.loads(lines[-1])["hash"], "anchor_found": None}

    def test_edited_line(self, log_path: Path, lines: list[bytes]) -> None:
        """A value changed in place (hash not recomputed) is named as that edited line."""
        lines[2] = lines[2].replace(b"p/2", b"p/9")
        assert "edited" in self.check(log_path, lines, "edited", 3)

    def test_edited_last_line(self, log_path: Path, lines: list[bytes]) -> None:
        """Even the last line, which no later record links to, is caught when edited."""
        lines[-1] = lines[-1].replace(b"GetKey", b"Version")
        self.check(log_path, lines, "edited", 6)

    def test_edited_and_rehashed_line(self, log_path: Path, lines: list[bytes]) -> None:
        """A line edited with its own hash recomputed is named through the next line's link."""
        lines[2] = rehash(lines[2], method="Info")
        message = self.check(log_path, lines, "edited", 3)
        assert "line 4 links to a different record" in message

    def test_dropped_line(self, log_path: Path, lines: list[bytes]) -> None:
        """A line removed from the middle is reported as dropped before the next one."""
        del lines[3]
        assert "record 4 dropped before line 4" in self.check(log_path, lines, "dropped", 4)

    def test_dropped_first_line(self, log_path: Path, lines: list[bytes]) -> None:
        """Removing the first record is noticed: the file must start the chain."""
        del lines[0]
        self.check(log_path, lines, "dropped", 1)

    def test_reordered_lines(self, log_path: Path, lines: list[bytes]) -> None:
        """Two swapped lines are reported as out of order, at the first of them."""
        lines[1], lines[2] = lines[2], lines[1]
        assert "out of order" in self.check(log_path, lines, "reordered", 2)

    def test_repeated_line(self, log_path: Path, lines: list[bytes]) -> None:
        """A replayed (duplicated) line is out of order."""
        lines.insert(3, lines[2])
        self.check(log_path, lines, "reordered", 4)

    def test_renumbered_forgery(self, log_path: Path, lines: list[bytes]) -> None:
        """Dropping a line and renumbering the rest still breaks the chain's links."""
        del lines[2]
        lines[2:] = [rehash(raw, seq=json.loads(raw)["seq"] - 1) for raw in lines[2:]]
        self.check(log_path, lines, "edited", 2)

    @pytest.mark.parametrize(
        "garbage", [b"not json\n", b"\n", b"[1,2]\n", b'{"v": 1}\n', b"{}\n"]
    )
    def test_garbage_line(self, log_path: Path, lines: list[bytes], garbage: bytes) -> None:
        """A line that is not a record of this format is named as invalid."""
        lines.insert(2, garbage)
        self.check(log_path, lines, "invalid", 3)

    def test_non_canonical_line(self, log_path: Path, lines: list[bytes]) -> None:
        """Re-serialising a record (same meaning, other bytes) is not accepted."""
        lines[1] = json.dumps(json.loads(lines[1]), indent=1).replace("\n", " ").encode() + b"\n"
        self.check(log_path, lines, "invalid", 2)

    def test_torn_last_line(self, log_path: Path, lines: list[bytes]) -> None:
        """A last line cut short (a crash) is reported as torn, with exit status 3."""
        lines[-1] = lines[-1][:40]
        result_message = self.check(log_path, lines, "torn", 6)
        assert "torn" in result_message
        assert verify_audit_log(log_path).records == 5

    def test_missing_newline_is_torn(self, log_path: Path, lines: list[bytes]) -> None:
        """A complete record without its newline was never acknowledged: torn."""
        lines[-1] = lines[-1][:-1]
        self.check(log_path, lines, "torn", 6)

    def test_anchor(self, log_path: Path, lines: list[bytes]) -> None:
        """A head kept elsewhere exposes a chain rewritten or truncated after it."""
        anchor = json.loads(lines[4])["hash"]
        assert verify_audit_log(log_path, anchor=anchor).intact
        log_path.write_bytes(b"".join(lines[:4]))
        result = verify_audit_log(log_path, anchor=anchor)
        assert result.problem is None and not result.intact
        cli = run_cli("audit", "verify", str(log_path), "--anchor", anchor, check=False)
        assert cli.returncode == 1 and "not in the chain" in cli.stderr

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A missing file is an error (exit 2) naming it, not a traceback."""
        cli = run_cli("audit", "verify", str(tmp_path / "nope"), check=False)
        assert cli.returncode == 2 and "nope" in cli.stderr and "Traceback" not in cli.stderr


class TestRepair:
    def test_torn_tail_is_cut_and_chain_continues(self, log_path: Path, lines: list[bytes]) -> None:
        """open() removes a torn last line and the chain continues from the last intact one."""
        log_path.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])
        log, torn = AuditLog.open(log_path)
        asyncio.run(log.close())
        assert torn == 25
        assert log.head == json.loads(lines[-2])["hash"]
        write_log(log_path, 1)
        result = verify_audit_log(log_path)
        assert result.intact and result.records == 6

    def test_torn_only_line(self, log_path: Path) -> None:
        """A file holding only a torn line becomes an empty log starting at genesis."""
        log_path.write_bytes(b'{"v":1,"se')
        log, torn = AuditLog.open(log_path)
        asyncio.run(log.close())
        assert (torn, log.head, log_path.read_bytes()) == (10, GENESIS, b"")

    def test_corrupt_last_record_refuses_to_continue(self, log_path: Path, lines: list[bytes]) -> None:
        """A complete but edited last record stops start-up: the log is never overwritten."""
        log_path.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b"p/5", b"p/0"))
        before = log_path.read_bytes()
        with pytest.raises(ConfigurationError, match="audit verify"):
            AuditLog.open(log_path)
        assert log_path.read_bytes() == before

    def test_unopenable(self, tmp_path: Path) -> None:
        """A directory in place of the log is a start-up error naming it."""
        with pytest.raises(ConfigurationError, match="cannot open audit log"):
            AuditLog.open(tmp_path)


class TestFaults:
    def test_write_failure_raises_audit_unavailable(self) -> None:
        """A log whose writes fail (/dev/full: ENOSPC) refuses each append with 503."""
        if not os.access("/dev/full", os.W_OK):
            pytest.skip("/dev/full is not writable here")

        async def attempt() -> None:
            log, _ = AuditLog.open(Path("/dev/full"))
            try:
                for _ in range(2):
                    with pytest.raises(AuditUnavailable) as caught:
                        await log.append(entry(0))
                    assert caught.value.http_status == 503
                    assert caught.value.code == "audit_unavailable"
            finally:
                await log.close()

        asyncio.run(attempt())

    def test_full_disk_leaves_no_partial_record_and_heals(self, tiny_tmpfs: Path) -> None:
        """On a full file system appends fail whole, nothing partial stays, and they work
        again once space is freed (a real tmpfs, not a simulated error)."""
        path = tiny_tmpfs / "audit.log"
        filler = tiny_tmpfs / "filler"

        async def scenario() -> None:
            log, _ = AuditLog.open(path)
            try:
                await log.append(entry(0))
                with filler.open("wb", buffering=0) as f, pytest.raises(OSError):
                    while True:
                        f.write(b"\0" * 4096)
                big = {**entry(1), "args": {"path": "x" * 20000}}
                with pytest.raises(AuditUnavailable):
                    await log.append(big)
                assert verify_audit_log(path).intact
                filler.unlink()
                await log.append(big)
            finally:
                await log.close()

        asyncio.run(scenario())
        result = verify_audit_log(path)
        assert result.intact and result.records == 2
