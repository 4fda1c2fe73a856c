"""Caller policy and audit log end to end: a real agent, clients in real processes.

Clients are separate processes running the official Python SDK (``dstack_sdk``). To be a
caller under another uid, a client starts as root, imports what it needs, then drops to
the uid/gid with ``os.setgid``/``os.setuid`` *before it connects* (the kernel records the
credentials at ``connect()``). It drops in-process rather than in ``preexec_fn`` because
the interpreter may live where other users cannot execute it (e.g. under ``/root``).
Tests that need root skip when not root, and say so.

The cgroup test places its client in a real cgroup v2 group (root and a writable cgroup2
mount needed, else it skips); tests/test_peercred.py covers parsing through the
``proc_root`` seam. The disk-full test fills a real tmpfs.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dstack_core.audit import verify_audit_log
from dstack_core.testing import AgentProcess, short_tempdir
from dstack_core.testing.fake_tee import FakeTdxMachine

from .conftest import run_cli
from .test_lifecycle import free_port
from .test_peercred import real_cgroup  # noqa: F401  (fixture)

CONFINED_UID = 1000
OTHER_UID = 1001
POLICY = f"""
default = "allow"

[[rule]]
match = {{ uid = {CONFINED_UID} }}
methods = ["GetKey", "DeriveK256Key", "Info", "Version"]
key_paths = ["app/web/"]
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run clients under other uids"
)

CLIENT = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
import httpx
from dstack_sdk import DstackClient
from dstack_core.testing.agent import uds_request
if spec.get("cgroup_procs"):
    with open(spec["cgroup_procs"], "w") as f:
        f.write(str(os.getpid()))
if spec.get("uid") is not None:
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
client = DstackClient(spec["socket"], timeout=30)
results = []
for name, *args in spec["ops"]:
    if name == "raw":
        verb, path, body = args
        data = None if body is None else json.dumps(body).encode()
        status, _, raw = uds_request(spec["socket"], verb, path, data)
        results.append({"status": status, "body": json.loads(raw)})
        continue
    try:
        result = getattr(client, name)(*args)
    except httpx.HTTPStatusError as exc:
        results.append({"status": exc.response.status_code, "body": exc.response.json()})
    else:
        body = result.model_dump(mode="json") if result is not None else {}
        results.append({"status": 200, "body": body})
print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "results": results}))
"""


def run_client(
    socket: Path,
    ops: Sequence[Sequence[Any]],
    *,
    uid: int | None = None,
    cgroup_procs: Path | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Run ``ops`` (SDK method name and arguments, or ``("raw", verb, path, body)``) in a
    client process as ``uid`` (and gid ``uid``); returns its pid and the results."""
    spec = {"socket": str(socket), "ops": [list(op) for op in ops], "uid": uid,
            "cgroup_procs": str(cgroup_procs) if cgroup_procs else None}
    proc = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(spec)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert uid is None or out["uid"] == uid
    return out["pid"], out["results"]


def statuses(results: list[dict[str, Any]]) -> list[int]:
    return [r["status"] for r in results]


def records(audit_log: Path, **match: Any) -> list[dict[str, Any]]:
    """The audit log's call records whose fields equal ``match`` (``pid`` matches the caller)."""
    pid = match.pop("pid", None)
    found = []
    for line in audit_log.read_text().splitlines():
        record = json.loads(line)
        if record["event"] != "call":
            continue
        caller = record["caller"]
        if pid is not None and (not isinstance(caller, dict) or caller["pid"] != pid):
            continue
        if all(record.get(k) == v for k, v in match.items()):
            found.append(record)
    return found


def assert_forbidden(result: dict[str, Any], *names: str) -> None:
    """A 403 ``forbidden`` naming ``names`` and nothing of the policy."""
    assert result["status"] == 403, result
    body = result["body"]
    assert set(body) == {"error", "code"} and body["code"] == "forbidden"
    for name in names:
        assert name in body["error"]
    for secret in ("app/web/", str(CONFINED_UID), "rule", "uid"):
        assert secret not in body["error"], body


def open_workdir() -> Path:
    """A directory other users can reach a socket in (short, under /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="dpol", dir="/tmp"))
    path.chmod(0o755)
    return path


def policy_agent(workdir: Path, policy: str) -> AgentProcess:
    """A started simulator agent in ``workdir`` under ``policy``, auditing to audit.log,
    its socket open to every uid."""
    (workdir / "policy.toml").write_text(policy)
    return AgentProcess("simulator", workdir=workdir, extra_args=[
        "--socket-mode", "0666", "--policy", str(workdir / "policy.toml"),
        "--audit-log", str(workdir / "audit.log"),
    ]).start()


@pytest.fixture(scope="module")
def shared() -> Iterator[AgentProcess]:
    """A simulator agent under POLICY with an audit log, its socket open to every uid."""
    workdir = open_workdir()
    agent = policy_agent(workdir, POLICY)
    yield agent
    agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def unconfined_key(agent: AgentProcess, path: str) -> str:
    status, body = agent.call("GetKey", {"path": path})
    assert status == 200
    return str(body["key"])


@needs_root
class TestCallers:
    def test_confined_caller(self, shared: AgentProcess) -> None:
        """uid 1000 derives keys under app/web/ with the SDK; 403 elsewhere and for methods
        it lacks; each case is in the audit log with its identity."""
        pid, results = run_client(shared.socket, [
            ("get_key", "app/web/tls", "p"), ("get_key", "app/db/password", "p"),
            ("emit_event", "deploy", "v2"), ("sign", "secp256k1", "hi"),
            ("get_quote", "rd"), ("info",),
        ], uid=CONFINED_UID)
        assert statuses(results) == [200, 403, 403, 403, 403, 200]
        assert results[0]["body"]["key"] == unconfined_key(shared, "app/web/tls")
        assert_forbidden(results[1], "GetKey", "app/db/password")
        assert_forbidden(results[2], "EmitEvent")
        assert_forbidden(results[3], "Sign")
        assert_forbidden(results[4], "GetQuote")
        log = shared.workdir / "audit.log"
        identity = {"pid": pid, "uid": CONFINED_UID, "gid": CONFINED_UID}
        allowed = records(log, pid=pid, method="GetKey", outcome="allowed")
        assert [r["args"]["path"] for r in allowed] == ["app/web/tls"]
        assert {k: allowed[0]["caller"][k] for k in identity} == identity
        assert allowed[0]["caller"]["cgroup"].startswith("/")
        denied = records(log, pid=pid, outcome="denied")
        assert [r["method"] for r in denied] == ["GetKey", "EmitEvent", "Sign", "GetQuote"]
        assert denied[0]["args"]["path"] == "app/db/password"
        assert all(r["code"] == "forbidden" for r in denied)
        assert not records(log, pid=pid, method="Info")

    def test_every_route_is_judged_alike(self, shared: AgentProcess) -> None:
        """/M, /prpc/M, /prpc/Tappd.M, GET and POST reach the same decision for the same call."""
        denied = {"path": "app/db/x", "purpose": "p"}
        granted = {"path": "app/web/x", "purpose": "p"}
        routes = [("POST", "/GetKey"), ("POST", "/prpc/GetKey"),
                  ("POST", "/prpc/Tappd.DeriveK256Key"), ("POST", "/prpc/DeriveK256Key"),
                  ("POST", "/prpc/Tappd.Tappd.DeriveK256Key")]
        ops: list[tuple[Any, ...]] = []
        for verb, path in routes:
            ops += [("raw", verb, path, denied), ("raw", verb, path, granted)]
        ops += [("raw", "GET", "/GetKey?path=app/db/x", None),
                ("raw", "GET", "/prpc/GetKey?path=app/web/x", None),
                ("raw", "POST", "/prpc/Tappd.DeriveKey", {"path": "app/web/x"}),
                ("raw", "POST", "/prpc/Tappd.RawQuote", {"report_data": "00" * 64})]
        _, results = run_client(shared.socket, ops, uid=CONFINED_UID)
        for (verb, path), refused, served in zip(routes, results[0::2], results[1::2]):
            assert_forbidden(refused, "app/db/x")
            assert served["status"] == 200, (verb, path, served)
        keys = {r["body"].get("key") or r["body"].get("k256_key") for r in results[1:10:2]}
        assert keys == {unconfined_key(shared, "app/web/x")}
        assert_forbidden(results[10], "GetKey")
        assert results[11]["status"] == 200
        assert_forbidden(results[12], "DeriveKey")
        assert_forbidden(results[13], "RawQuote")

    def test_unconfined_caller_is_unaffected(self, shared: AgentProcess) -> None:
        """Another uid (no rule matches, default allow) calls everything; it is audited
        with digests, never with keys or payloads."""
        pid, results = run_client(shared.socket, [
            ("get_key", "app/db/password", "p"), ("emit_event", "deploy", "secret-payload"),
            ("sign", "secp256k1", "secret-data"), ("get_quote", "rd"),
            ("get_tls_key", "db.internal", ["db.internal"]),
        ], uid=OTHER_UID)
        assert statuses(results) == [200] * 5
        log = shared.workdir / "audit.log"
        text = log.read_text()
        assert results[0]["body"]["key"] not in text
        assert results[2]["body"]["signature"] not in text
        assert b"secret-payload".hex() not in text and "secret-payload" not in text
        assert b"secret-data".hex() not in text
        emit = records(log, pid=pid, method="EmitEvent")
        assert [r["outcome"] for r in emit] == ["allowed"]
        assert emit[0]["args"]["event"] == "deploy"
        assert emit[0]["args"]["payload"]["length"] == len("secret-payload")
        sign = records(log, pid=pid, method="Sign")[0]
        assert sign["args"]["algorithm"] == "secp256k1" and len(sign["args"]["data"]["sha256"]) == 64
        tls = records(log, pid=pid, method="GetTlsKey")[0]
        assert (tls["args"]["subject"], tls["args"]["alt_names"]) == ("db.internal", ["db.internal"])
        assert not records(log, pid=pid, method="GetQuote")

    def test_audit_log_verifies_and_catches_edits(
        self, shared: AgentProcess, tmp_path: Path
    ) -> None:
        """The live agent's log verifies; an edited, dropped or reordered copy does not."""
        run_client(shared.socket, [("get_key", "app/db/x", "p")], uid=CONFINED_UID)
        log = shared.workdir / "audit.log"
        assert run_cli("audit", "verify", str(log)).returncode == 0
        lines = log.read_bytes().splitlines(keepends=True)
        denial = next(i for i, raw in enumerate(lines) if b'"outcome":"denied"' in raw)
        tampered = {
            "edited": lines[:denial] + [lines[denial].replace(b'"denied"', b'"allowed"')]
            + lines[denial + 1:],
            "dropped": lines[:denial] + lines[denial + 1:],
            "reordered": lines[:denial - 1] + [lines[denial], lines[denial - 1]]
            + lines[denial + 1:],
        }
        for kind, content in tampered.items():
            copy = tmp_path / f"{kind}.log"
            copy.write_bytes(b"".join(content))
            cli = run_cli("audit", "verify", str(copy), check=False)
            assert cli.returncode == 1, (kind, cli.stdout)
            line = denial + 1 if kind != "reordered" else denial
            assert f"line {line}" in cli.stderr, (kind, cli.stderr)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """An agent directory other uids can reach, removed after the test."""
    path = open_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


class TestCgroup:
    def test_cgroup_confines_root(
        self, real_cgroup: tuple[Path, str], workdir: Path  # noqa: F811
    ) -> None:
        """A root process in a confined cgroup (root in a container) gets only what its
        cgroup rule grants; root outside it is unaffected. Uses a real cgroup v2 group."""
        directory, path = real_cgroup
        policy = (f'default = "allow"\n[[rule]]\nmatch = {{ cgroup = "{path}*" }}\n'
                  'methods = ["Info", "Version"]\n')
        agent = policy_agent(workdir, policy)
        try:
            pid, results = run_client(agent.socket, [("get_key", "any", "p"), ("info",)],
                                      cgroup_procs=directory / "cgroup.procs")
            assert statuses(results) == [403, 200]
            assert_forbidden(results[0], "GetKey")
            _, outside = run_client(agent.socket, [("get_key", "any", "p")])
            assert statuses(outside) == [200]
            denied = records(workdir / "audit.log", pid=pid, outcome="denied")
            assert denied[0]["caller"]["cgroup"] == path and denied[0]["rule"] == 1
        finally:
            agent.stop()


def tcp_call(port: int, method: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/{method}", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture
def tdx_workdir() -> Iterator[Path]:
    """A directory for a fake TD and its agent, removed after the test."""
    path = short_tempdir("ptdx")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class TestTcp:
    def tdx_agent(self, workdir: Path, *extra: str) -> tuple[AgentProcess, int]:
        machine = FakeTdxMachine.create(workdir / "tree")
        port = free_port()
        agent = machine.agent(workdir=workdir, extra_args=["--listen", f"127.0.0.1:{port}",
                                                           *extra])
        return agent.start(), port

    def test_no_grant_no_key_over_tcp(self, tdx_workdir: Path) -> None:
        """On tdx (not simulated) without a policy, TCP gets 403 for key-bearing and
        measuring methods, the rest as before, Unix callers everything; said at start-up."""
        agent, port = self.tdx_agent(tdx_workdir)
        try:
            status, body = tcp_call(port, "GetKey", {"path": "app/x"})
            assert (status, body["code"]) == (403, "forbidden") and "GetKey" in body["error"]
            for method, args in (("Sign", {"algorithm": "ed25519", "data": "00"}),
                                 ("EmitEvent", {"event": "x", "payload": "00"}),
                                 ("GetTlsKey", {"subject": "x"}),
                                 ("prpc/GetKey", {"path": "app/x"}),
                                 ("prpc/Tappd.DeriveK256Key", {"path": "app/x"}),
                                 ("prpc/Tappd.DeriveKey", {"path": "app/x"})):
                assert tcp_call(port, method, args)[0] == 403, method
            assert tcp_call(port, "Version", {})[0] == 200
            assert tcp_call(port, "GetQuote", {"report_data": "00"})[0] == 200
            assert agent.call("GetKey", {"path": "app/x"})[0] == 200
            log = agent.output()
            assert "is not simulated" in log and "not served over TCP" in log
            assert "GetKey" in log and "EmitEvent" in log
        finally:
            agent.stop()

    def test_explicit_grant_and_audit(self, tdx_workdir: Path) -> None:
        """A tcp = true rule grants TCP what it lists, within its key paths; TCP calls are
        audited as the caller "tcp"."""
        (tdx_workdir / "policy.toml").write_text(
            'default = "allow"\n[[rule]]\nmatch = { tcp = true }\n'
            'methods = ["GetKey", "Version"]\nkey_paths = ["public/"]\n')
        audit = tdx_workdir / "audit.log"
        agent, port = self.tdx_agent(tdx_workdir, "--policy", str(tdx_workdir / "policy.toml"),
                                     "--audit-log", str(audit))
        try:
            assert tcp_call(port, "GetKey", {"path": "public/a"})[0] == 200
            assert_forbidden(dict(zip(("status", "body"),
                                      tcp_call(port, "GetKey", {"path": "private/a"}))),
                             "private/a")
            assert tcp_call(port, "Info", {})[0] == 403
            assert "grants GetKey to unauthenticated TCP" in agent.output()
        finally:
            agent.stop()
        calls = records(audit)
        assert [(r["caller"], r["method"], r["outcome"]) for r in calls] == [
            ("tcp", "GetKey", "allowed"), ("tcp", "GetKey", "denied"), ("tcp", "Info", "denied")]
        assert all(r["peer"].startswith("127.0.0.1:") for r in calls)
        assert verify_audit_log(audit).intact

    def test_simulator_tcp_unchanged(self, workdir: Path) -> None:
        """On the simulator, without a policy, TCP serves GetKey as it always did."""
        port = free_port()
        agent = AgentProcess("simulator", workdir=workdir,
                             extra_args=["--listen", f"127.0.0.1:{port}"]).start()
        try:
            status, body = tcp_call(port, "GetKey", {"path": "p"})
            assert status == 200 and body["key"] == unconfined_key(agent, "p")
            assert "simulated" in agent.output()
        finally:
            agent.stop()


class TestStartup:
    def test_bad_policy_stops_startup(self, workdir: Path) -> None:
        """An invalid policy: exit 2 naming file, rule and key; no socket, no audit log."""
        (workdir / "policy.toml").write_text(
            'default = "deny"\n[[rule]]\nmatch = { uid = 1 }\nmethods = ["GetKey"]\n'
            '[[rule]]\nmatch = { uid = 2 }\nmethods = ["GetKeys"]\n')
        agent = AgentProcess("simulator", workdir=workdir, extra_args=[
            "--policy", str(workdir / "policy.toml"), "--audit-log", str(workdir / "audit.log")])
        agent.start(wait=False)
        assert agent.proc is not None and agent.proc.wait(30) == 2
        error = agent.output().strip().splitlines()[-1]
        assert error.startswith(f"dstack-agent: error: policy file {workdir / 'policy.toml'}: "
                                "rule 2: methods: unknown method 'GetKeys'")
        assert not agent.socket.exists() and not (workdir / "audit.log").exists()

    def test_config_file_keys(self, workdir: Path) -> None:
        """policy and audit_log in the config file work as --policy and --audit-log."""
        (workdir / "policy.toml").write_text('default = "deny"\n[[rule]]\n'
                                             f'match = {{ uid = {os.getuid()} }}\n'
                                             'methods = ["Version", "GetKey"]\n')
        (workdir / "agent.toml").write_text(f'policy = "{workdir / "policy.toml"}"\n'
                                            f'audit_log = "{workdir / "audit.log"}"\n')
        agent = AgentProcess("simulator", workdir=workdir,
                             extra_args=["--config", str(workdir / "agent.toml")]).start()
        try:
            assert agent.call("GetKey", {"path": "a"})[0] == 200
            status, body = agent.call("Info")
            assert (status, body["code"]) == (403, "forbidden")
        finally:
            agent.stop()
        assert [r["method"] for r in records(workdir / "audit.log")] == ["GetKey", "Info"]

    @needs_root
    def test_without_policy_everyone_may_call_everything(self, workdir: Path) -> None:
        """Without --policy (today's behaviour) any uid that can connect calls everything."""
        agent = AgentProcess("simulator", workdir=workdir,
                             extra_args=["--socket-mode", "0666"]).start()
        try:
            _, results = run_client(agent.socket, [
                ("get_key", "app/db/x", "p"), ("emit_event", "e", "x"), ("sign", "ed25519", "x"),
                ("raw", "POST", "/prpc/Tappd.DeriveKey", {"path": "a"}),
            ], uid=CONFINED_UID)
            assert statuses(results) == [200] * 4
        finally:
            agent.stop()
        assert not (workdir / "audit.log").exists()


class TestAuditDurability:
    def test_torn_tail_reported_then_repaired_at_startup(self, workdir: Path) -> None:
        """A torn last line is 'torn' (exit 3) to audit verify; the next start removes it,
        records how many bytes it removed, and the chain verifies again."""
        agent = policy_agent(workdir, 'default = "allow"\n')
        agent.call("GetKey", {"path": "a"})
        agent.stop()
        log = workdir / "audit.log"
        with log.open("ab") as f:
            f.write(b'{"args":{"path":"half-writ')
        cli = run_cli("audit", "verify", str(log), check=False)
        assert cli.returncode == 3 and "torn" in cli.stderr
        agent.start()
        agent.call("GetKey", {"path": "b"})
        agent.stop()
        assert run_cli("audit", "verify", str(log)).returncode == 0
        starts = [json.loads(line) for line in log.read_text().splitlines()
                  if '"event":"start"' in line]
        assert starts[-1]["torn_bytes_removed"] == len(b'{"args":{"path":"half-writ')

    def test_sigkill_under_load_leaves_a_verifiable_log(self, workdir: Path) -> None:
        """SIGKILL during concurrent audited calls leaves an intact log or a torn tail;
        every acknowledged call is recorded, and a restart continues the chain."""
        agent = policy_agent(workdir, 'default = "allow"\n')
        acknowledged: list[str] = []

        def call(i: int) -> None:
            try:
                if agent.call("GetKey", {"path": f"k/{i}"})[0] == 200:
                    acknowledged.append(f"k/{i}")
            except OSError:
                pass

        total = 5000
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call, i) for i in range(total)]
            deadline = time.monotonic() + 60
            while len(acknowledged) < 50 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait()
            concurrent.futures.wait(futures)
        assert 50 <= len(acknowledged) < total, "the kill did not land mid-stream"
        log = workdir / "audit.log"
        result = verify_audit_log(log)
        assert result.problem is None or result.problem.kind == "torn", result.problem
        recorded = {r["args"]["path"] for r in records(log)}
        assert set(acknowledged) <= recorded
        agent.start()
        agent.stop()
        assert verify_audit_log(log).intact

    def test_disk_full_fails_closed_and_heals(self, tiny_tmpfs: Path, workdir: Path) -> None:
        """With the audit log's file system full, the agent starts, serves what is not
        audited, and answers audited calls 503 audit_unavailable without doing them (no key,
        RTMR3 unmoved); once space is freed the same calls succeed without a restart and
        the log verifies. The file system is a real, full tmpfs."""
        log = tiny_tmpfs / "audit.log"
        filler = tiny_tmpfs / "filler"
        with filler.open("wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        (workdir / "policy.toml").write_text('default = "allow"\n')
        agent = AgentProcess("simulator", workdir=workdir, extra_args=[
            "--policy", str(workdir / "policy.toml"), "--audit-log", str(log)]).start()
        try:
            rtmr3 = json.loads(agent.call("Info")[1]["tcb_info"])["rtmr3"]
            for method, args in (("GetKey", {"path": "a"}),
                                 ("EmitEvent", {"event": "e", "payload": "00"}),
                                 ("Sign", {"algorithm": "ed25519", "data": "00"})):
                status, body = agent.call(method, args)
                assert (status, body["code"]) == (503, "audit_unavailable"), method
                assert set(body) == {"error", "code"}
                assert str(tiny_tmpfs) not in body["error"]
            assert json.loads(agent.call("Info")[1]["tcb_info"])["rtmr3"] == rtmr3
            assert agent.call("GetQuote", {"report_data": "00"})[0] == 200
            assert agent.output().count(f"audit log {log} cannot be written") == 1
            filler.unlink()
            assert agent.call("GetKey", {"path": "a"})[0] == 200
            assert agent.call("EmitEvent", {"event": "e", "payload": "00"})[0] == 200
            assert json.loads(agent.call("Info")[1]["tcb_info"])["rtmr3"] != rtmr3
            assert "writable again" in agent.output()
        finally:
            agent.stop()
        result = verify_audit_log(log)
        assert result.intact
        assert [r["method"] for r in records(log)] == ["GetKey", "EmitEvent"]
