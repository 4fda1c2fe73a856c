"""Upstream's process model with real processes: the Tappd socket, systemd activation by
LISTEN_FDNAMES, the watchdog, the external port (Worker methods, metrics, status page) and
upstream's dstack.toml as the config file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dstack_sdk import DstackClient, TappdClient
from prometheus_client.parser import text_string_to_metric_families

from dstack_core.inputs import app_compose_document, document_text, sys_config_document
from dstack_core.quote import TdxQuote
from dstack_core.testing import AgentProcess, short_tempdir, uds_request
from dstack_core.testing.fake_tee import FakeTdxMachine

from .conftest import UPSTREAM_APPKEYS
from .test_lifecycle import free_port


def http(url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- the Tappd socket --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tappd_agent() -> Iterator[AgentProcess]:
    workdir = short_tempdir("tpd")
    agent = AgentProcess("simulator", workdir=workdir,
                         extra_args=["--tappd-socket", str(workdir / "tappd.sock")]).start()
    yield agent
    agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class TestTappdSocket:
    def test_sdk_tappd_client(self, tappd_agent):
        """The SDK's deprecated TappdClient works on the Tappd socket: TdxQuote hashes
        app-data:<data> into the report data, Info answers."""
        tappd = tappd_agent.workdir / "tappd.sock"
        client = TappdClient(str(tappd))
        quote = client.tdx_quote(b"tappd-data", "sha512")
        report = TdxQuote.from_bytes(quote.decode_quote()).report
        assert report.report_data == hashlib.sha512(b"app-data:tappd-data").digest()
        assert client.info().app_id

    def test_only_tappd_methods_answer(self, tappd_agent):
        """Tappd methods answer with and without the Tappd. prefix; DstackGuest methods and
        plain paths are 404, as upstream's tappd.sock."""
        tappd = tappd_agent.workdir / "tappd.sock"
        for path in ("/prpc/Tappd.DeriveKey", "/prpc/DeriveKey", "/prpc/Tappd.Tappd.DeriveKey"):
            status, _, body = uds_request(tappd, "POST", path, b'{"path":"p","subject":"s"}')
            assert status == 200, body
            assert len(json.loads(body)["certificate_chain"]) == 2
        for path in ("/prpc/GetKey", "/GetKey", "/prpc/Tappd.GetKey", "/prpc/GetTlsKey",
                     "/DeriveKey"):
            status, _, body = uds_request(tappd, "POST", path, b'{"path":"p"}')
            assert status == 404, (path, body)
            assert json.loads(body)["code"] == "not_found"

    def test_derived_key_is_the_same_on_both_sockets(self, tappd_agent):
        """The dstack socket keeps serving Tappd too; both give the same derived key."""
        args = b'{"path":"same","subject":"s"}'
        keys = [
            json.loads(uds_request(sock, "POST", "/prpc/Tappd.DeriveKey", args)[2])["key"]
            for sock in (tappd_agent.socket, tappd_agent.workdir / "tappd.sock")
        ]
        assert keys[0] == keys[1]

    def test_caller_policy_and_audit_cover_the_tappd_socket(self):
        """The caller policy judges Tappd calls on their own socket like any other, and the
        audit log records them."""
        workdir = short_tempdir("tpd")
        tappd = workdir / "tappd.sock"
        (workdir / "policy.toml").write_text(
            'default = "deny"\n[[rule]]\nmatch = { uid = %d }\n'
            'methods = ["Info", "Version", "TdxQuote"]\n' % os.getuid()
        )
        agent = AgentProcess("simulator", workdir=workdir, extra_args=[
            "--tappd-socket", str(tappd), "--policy", str(workdir / "policy.toml"),
            "--audit-log", str(workdir / "audit.log"),
        ]).start()
        try:
            status, _, body = uds_request(tappd, "POST", "/prpc/Tappd.DeriveKey",
                                          b'{"path":"p","subject":"s"}')
            assert status == 403 and json.loads(body)["code"] == "forbidden", body
            status, _, _ = uds_request(tappd, "POST", "/prpc/Tappd.TdxQuote",
                                       b'{"report_data":"00"}')
            assert status == 200
        finally:
            agent.stop()
        lines = [json.loads(line) for line in (workdir / "audit.log").read_text().splitlines()]
        assert any(e.get("method") == "DeriveKey" and e.get("outcome") == "denied" for e in lines)
        shutil.rmtree(workdir, ignore_errors=True)

    def test_socket_mode_and_cleanup(self):
        """The Tappd socket gets --socket-mode and is removed on shutdown."""
        workdir = short_tempdir("tpd")
        tappd = workdir / "tappd.sock"
        agent = AgentProcess("simulator", workdir=workdir,
                             extra_args=["--tappd-socket", str(tappd), "--socket-mode", "0600"])
        agent.start()
        try:
            assert tappd.stat().st_mode & 0o777 == 0o600
        finally:
            assert agent.stop() == 0
        assert not tappd.exists()
        shutil.rmtree(workdir, ignore_errors=True)


# --- socket activation by name -------------------------------------------------------------

ACTIVATE = textwrap.dedent("""
    import json, os, socket, sys
    paths, names, argv = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
    listeners = []
    for path in paths:
        if path.startswith("tcp:"):  # tcp:PORT on 127.0.0.1
            listener = socket.create_server(("127.0.0.1", int(path[4:])))
        else:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(16)
        listeners.append(listener)
    # move them to 3, 4, ... (first out of the way, then into place)
    moved = [os.dup(listener.fileno()) for listener in listeners]
    high = [os.dup2(fd, 50 + index) for index, fd in enumerate(moved)]
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)
        os.set_inheritable(3 + index, True)
    os.environ["LISTEN_FDS"] = str(len(paths))
    os.environ["LISTEN_PID"] = str(os.getpid())
    if names:
        os.environ["LISTEN_FDNAMES"] = names
    os.execv(sys.executable, [sys.executable, "-m", "dstack_core.cli", *argv])
""")


def activated_agent(workdir: Path, paths: list[Path | str], names: str) -> subprocess.Popen[bytes]:
    log = (workdir / "agent.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, json.dumps([str(p) for p in paths]), names,
         "serve", "--platform", "simulator", "--socket", str(workdir / "unused.sock"),
         "--state-dir", str(workdir / "state")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


def answers(path: Path, request_path: str, body: bytes = b"{}") -> int:
    try:
        return uds_request(path, "POST", request_path, body, timeout=5)[0]
    except OSError:
        return 0


class TestActivationByName:
    @pytest.mark.parametrize("names", ["tappd:dstack", ""])
    def test_sockets_by_name_or_position(self, names):
        """LISTEN_FDNAMES dstack/tappd decide which socket serves which API, in any order;
        without names the order is upstream's (dstack first, tappd second)."""
        workdir = short_tempdir("act")
        first, second = workdir / "first.sock", workdir / "second.sock"
        dstack, tappd = (second, first) if names else (first, second)
        proc = activated_agent(workdir, [first, second], names)
        try:
            wait_for(lambda: answers(dstack, "/Version") == 200 or proc.poll() is not None,
                     what="the activated agent")
            assert proc.poll() is None, (workdir / "agent.log").read_text()
            assert answers(dstack, "/GetKey", b'{"path":"a"}') == 200
            assert answers(tappd, "/prpc/Tappd.Info") == 200
            assert answers(tappd, "/GetKey", b'{"path":"a"}') == 404
            assert not (workdir / "unused.sock").exists()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        assert first.exists() and second.exists(), "systemd owns the socket files"
        shutil.rmtree(workdir, ignore_errors=True)

    def test_external_port_from_systemd(self):
        """A TCP socket named external serves the external port (no --external-listen)."""
        workdir = short_tempdir("act")
        port = free_port()
        proc = activated_agent(workdir, [f"tcp:{port}", workdir / "d.sock"], "external:dstack")
        try:
            wait_for(lambda: answers(workdir / "d.sock", "/Version") == 200
                     or proc.poll() is not None, what="the activated agent")
            assert proc.poll() is None, (workdir / "agent.log").read_text()
            status, _, body = http(f"http://127.0.0.1:{port}/prpc/Worker.Version")
            assert status == 200 and json.loads(body)["version"]
            assert http(f"http://127.0.0.1:{port}/prpc/GetKey", b"{}")[0] == 404
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        shutil.rmtree(workdir, ignore_errors=True)

    def test_unknown_distinct_names_fail_closed(self):
        """Sockets named neither dstack nor tappd: a clean start-up error, exit 2."""
        workdir = short_tempdir("act")
        proc = activated_agent(workdir, [workdir / "a.sock", workdir / "b.sock"], "web:admin")
        assert proc.wait(30) == 2
        assert "cannot tell the sockets apart" in (workdir / "agent.log").read_text()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the watchdog ----------------------------------------------------------------------------

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s


class Notifications:
    """A NOTIFY_SOCKET listener collecting (monotonic time, state) datagrams."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((time.monotonic(), data.decode()))

    def pings_since(self, since: float) -> int:
        return sum(1 for at, state in list(self.received) if at >= since and state == "WATCHDOG=1")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def watched() -> Iterator[tuple[Any, Notifications]]:
    workdir = short_tempdir("wdg")
    machine = FakeTdxMachine.create(workdir / "tree")
    notes = Notifications(workdir / "notify")
    agent = machine.agent(workdir=workdir)
    agent.env.update({"NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    agent.start()
    yield agent, notes
    machine.clear_faults()
    if agent.proc is not None:
        agent.stop()
    notes.close()
    shutil.rmtree(workdir, ignore_errors=True)


class TestWatchdog:
    def test_pings_stop_while_a_quote_hangs_and_resume_after(self, watched):
        """WATCHDOG=1 every half WATCHDOG_USEC while the agent answers; when the host's quote
        service hangs (a GetQuote stuck in the kernel) the pings stop; when it answers again
        the request completes and the pings resume, without a restart."""
        agent, notes = watched
        wait_for(lambda: notes.pings_since(0) >= 3, what="the first pings")
        start = time.monotonic()
        time.sleep(2)
        assert 2 <= notes.pings_since(start) <= 6  # about one per 0.5 s
        agent.machine.hang_reports(120)
        answered: list[int] = []
        caller = threading.Thread(target=lambda: answered.append(
            uds_request(agent.socket, "POST", "/GetQuote", b'{"report_data":"01"}', timeout=120)[0]
        ))
        caller.start()
        # once the stuck hook is older than one interval, the probe fails (and says so)
        wait_for(lambda: "watchdog self-probe failed" in agent.output(), what="a failed probe")
        quiet_from = time.monotonic()
        time.sleep(2.5)
        assert notes.pings_since(quiet_from) == 0, "pinged while a platform call hung"
        assert caller.is_alive() and answers(agent.socket, "/Version") == 200
        agent.machine.hang_reports(0)
        caller.join(30)
        assert answered == [200]
        resumed = time.monotonic()
        wait_for(lambda: notes.pings_since(resumed) >= 2, what="pings after recovery")
        assert "watchdog self-probe failed" in agent.output()
        assert "platform hook get_quote has not returned" in agent.output()

    def test_pings_stop_when_the_api_socket_is_gone(self, watched):
        """The self-probe talks to the API as an app would: with the socket file removed
        (apps can no longer connect) the pings stop, so systemd restarts the agent."""
        agent, notes = watched
        wait_for(lambda: notes.pings_since(0) >= 2, what="the first pings")
        agent.socket.unlink()
        wait_for(lambda: "the API is not reachable" in agent.output(), what="a failed probe")
        quiet_from = time.monotonic()
        time.sleep(2)
        assert notes.pings_since(quiet_from) == 0

    def test_no_pings_for_another_pid(self):
        """WATCHDOG_PID naming another process: READY=1 but no watchdog pings."""
        workdir = short_tempdir("wdg")
        notes = Notifications(workdir / "notify")
        agent = AgentProcess("simulator", workdir=workdir, env={
            "NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": "1",
        }).start()
        try:
            wait_for(lambda: any(s == "READY=1" for _, s in notes.received), what="READY=1")
            time.sleep(1.5)
            assert notes.pings_since(0) == 0
        finally:
            agent.stop()
            notes.close()
            shutil.rmtree(workdir, ignore_errors=True)


# --- the external port -----------------------------------------------------------------------


def external_agent(compose: dict[str, Any] | None = None) -> tuple[AgentProcess, str]:
    workdir = short_tempdir("ext")
    port = free_port()
    extra = ["--external-listen", f"127.0.0.1:{port}"]
    if compose is not None:
        (workdir / "compose.json").write_text(document_text(compose))
        extra += ["--app-compose", str(workdir / "compose.json")]
    agent = AgentProcess("simulator", workdir=workdir, extra_args=extra).start()
    return agent, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def external() -> Iterator[tuple[AgentProcess, str]]:
    agent, base = external_agent(app_compose_document("ext-<app>"))
    yield agent, base
    agent.stop()
    shutil.rmtree(agent.workdir, ignore_errors=True)


def metrics(base: str) -> dict[str, list[Any]]:
    status, headers, body = http(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def sample(families: dict[str, list[Any]], family: str, name: str, **labels: str) -> float:
    for s in families.get(family, []):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError((name, labels))


class TestExternalPort:
    def test_worker_version_and_info(self, external):
        agent, base = external
        status, headers, body = http(base + "/prpc/Worker.Version")
        assert status == 200 and json.loads(body)["version"]
        assert headers["X-App-Version"].startswith("v")
        status, _, body = http(base + "/prpc/Worker.Info", b"{}")
        info = json.loads(body)
        assert status == 200 and info["app_id"] == agent.call("Info")[1]["app_id"]
        assert json.loads(info["tcb_info"])["rtmr3"] and info["vm_config"]

    @pytest.mark.parametrize("algorithm", ["ed25519", "secp256k1", "k256"])
    def test_attestation_for_app_key(self, external, algorithm):
        """Worker.GetAttestationForAppKey quotes dip1::<kind>-pk:<base64url of the vms key>."""
        agent, base = external
        status, _, body = http(base + "/prpc/Worker.GetAttestationForAppKey",
                               json.dumps({"algorithm": algorithm}).encode())
        assert status == 200, body
        result = json.loads(body)
        key = DstackClient(str(agent.socket)).get_key("vms", "signing", algorithm)
        if algorithm == "ed25519":
            import nacl.signing

            public = bytes(nacl.signing.SigningKey(key.decode_key()).verify_key)
            prefix = b"dip1::ed25519-pk:"
        else:
            from coincurve import PrivateKey

            public = PrivateKey(key.decode_key()).public_key.format(compressed=True)
            prefix = b"dip1::secp256k1c-pk:"
        expected = (prefix + base64.urlsafe_b64encode(public).rstrip(b"=")).ljust(64, b"\0")
        assert bytes.fromhex(result["report_data"]) == expected
        assert TdxQuote.from_bytes(bytes.fromhex(result["quote"])).report.report_data == expected

    @pytest.mark.parametrize("algorithm", ["", "secp256k1_prehashed", "rsa"])
    def test_attestation_for_app_key_refuses_other_algorithms(self, external, algorithm):
        status, _, body = http(external[1] + "/prpc/Worker.GetAttestationForAppKey",
                               json.dumps({"algorithm": algorithm}).encode())
        assert status == 400 and json.loads(body)["code"] == "unsupported_algorithm"

    @pytest.mark.parametrize("path", [
        "/prpc/Worker.GetKey", "/prpc/GetKey", "/GetKey", "/prpc/Worker.GetTlsKey",
        "/prpc/Sign", "/prpc/Tappd.DeriveKey", "/prpc/DeriveK256Key", "/prpc/GetQuote",
        "/prpc/EmitEvent", "/Info",
    ])
    def test_no_key_bearing_method_answers(self, external, path):
        """GetKey and every other method beyond upstream's external surface is 404."""
        status, _, body = http(external[1] + path, b'{"path":"vms"}')
        assert status == 404, body
        assert "key" not in json.loads(body)

    def test_metrics_count_requests_errors_quotes_and_log(self, external):
        """/metrics is Prometheus text from the Prometheus client: requests, errors and
        latency per method and listener, quote latency, the runtime log's length."""
        agent, base = external
        before = metrics(base)
        for _ in range(3):
            assert agent.call("GetKey", {"path": "m"})[0] == 200
        assert agent.call("NoSuchMethod")[0] == 404
        assert uds_request(agent.socket, "GET", "/no/such/path")[0] == 404
        assert uds_request(agent.socket, "PUT", "/GetKey", b"{}")[0] == 405
        assert uds_request(agent.socket, "DELETE", "/prpc/NoSuchMethod")[0] == 405
        status, quote = agent.call("GetQuote", {"report_data": "00"})
        after = metrics(base)

        def delta(family: str, name: str, **labels: str) -> float:
            try:
                old = sample(before, family, name, **labels)
            except KeyError:
                old = 0.0
            return sample(after, family, name, **labels) - old

        # The PUT is counted under GetKey too: the path names it.
        assert delta("dstack_requests", "dstack_requests_total",
                     listener="dstack", method="GetKey") == 4
        assert delta("dstack_request_errors", "dstack_request_errors_total",
                     listener="dstack", method="unknown", status="404") == 2
        assert delta("dstack_request_errors", "dstack_request_errors_total",
                     listener="dstack", method="GetKey", status="405") == 1
        assert delta("dstack_request_errors", "dstack_request_errors_total",
                     listener="dstack", method="unknown", status="405") == 1
        assert delta("dstack_request_duration_seconds", "dstack_request_duration_seconds_count",
                     listener="dstack", method="GetKey") == 4
        assert delta("dstack_quote_duration_seconds", "dstack_quote_duration_seconds_count",
                     hook="get_quote") >= 1
        runtime = [e for e in json.loads(quote["event_log"]) if e["imr"] == 3]
        assert sample(after, "dstack_runtime_events", "dstack_runtime_events") == len(runtime)
        # the default app-compose says public_sysinfo: upstream's system figures are there
        assert sample(after, "system_memory_total", "system_memory_total") > 0
        assert sample(after, "system_num_cpus", "system_num_cpus") >= 1
        assert sample(after, "disk_total_size", "disk_total_size", mount_point="/") > 0

    def test_status_page(self, external):
        """GET / is a small HTML page naming the app, with untrusted text escaped."""
        agent, base = external
        status, headers, body = http(base + "/")
        page = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert agent.call("Info")[1]["app_id"] in page
        assert "ext-&lt;app&gt;" in page and "ext-<app>" not in page

    def test_private_app_hides_tcb_info_and_system_figures(self):
        """public_tcbinfo false: Worker.Info's tcb_info and vm_config are empty; public_sysinfo
        false: no system figures in /metrics (the agent's own metrics stay)."""
        compose = {**app_compose_document("private"), "public_tcbinfo": False,
                   "public_sysinfo": False}
        agent, base = external_agent(compose)
        try:
            info = json.loads(http(base + "/prpc/Info", b"{}")[2])
            assert info["tcb_info"] == "" and info["vm_config"] == "" and info["app_id"]
            assert json.loads(agent.call("Info")[1]["tcb_info"])["rtmr3"]  # internal: all
            families = metrics(base)
            assert "system_memory_total" not in families and "dstack_requests" in families
        finally:
            agent.stop()
            shutil.rmtree(agent.workdir, ignore_errors=True)


# --- upstream's dstack.toml ------------------------------------------------------------------


def test_upstream_dstack_toml_is_the_config_file():
    """Upstream's dstack.toml (the keys its image sets, plus one it does not know) configures
    the inputs and all three listeners; the unknown key is reported in the log."""
    workdir = short_tempdir("toml")
    shared = workdir / "host-shared"
    shared.mkdir()
    shutil.copy(UPSTREAM_APPKEYS, shared / ".appkeys.json")
    (shared / "app-compose.json").write_text(document_text(app_compose_document("toml-app")))
    (shared / ".sys-config.json").write_text(
        document_text(sys_config_document(os_image_hash="ab" * 32))
    )
    port = free_port()
    config = workdir / "dstack.toml"
    config.write_text(textwrap.dedent(f"""
        [default]
        workers = 8
        max_blocking = 64
        ident = "dstack guest agent"
        temp_dir = "/tmp"
        keep_alive = 10
        log_level = "debug"

        [default.core]
        keys_file = "{shared}/.appkeys.json"
        compose_file = "{shared}/app-compose.json"
        sys_config_file = "{shared}/.sys-config.json"
        data_disks = ["/"]
        frobnicate = true

        [internal-v0]
        address = "unix:{workdir}/tappd.sock"
        reuse = true

        [internal]
        address = "unix:{workdir}/dstack.sock"
        reuse = true

        [external]
        address = "127.0.0.1"
        port = {port}

        [guest-api]
        address = "vsock:0xffffffff"
        port = 8000
    """))
    log = (workdir / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstack_core.cli", "serve", "--platform", "simulator",
         "--state-dir", str(workdir / "state"), "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: answers(workdir / "dstack.sock", "/Version") == 200
                 or proc.poll() is not None, what="the agent")
        assert proc.poll() is None, (workdir / "agent.log").read_text()
        key = json.loads(uds_request(workdir / "dstack.sock", "POST", "/GetKey",
                                     b'{"path":"/test/path","purpose":"test-purpose"}')[2])["key"]
        assert key == "b9fbb7171185c421c58610a2acba8ceae93623ae47815618cbad1e98fc042cb7"
        assert answers(workdir / "tappd.sock", "/prpc/Tappd.Info") == 200
        info = json.loads(http(f"http://127.0.0.1:{port}/prpc/Worker.Info", b"{}")[2])
        assert info["app_name"] == "toml-app"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        log.close()
    output = (workdir / "agent.log").read_text()
    assert "unknown keys ignored: default.core.frobnicate" in output
    assert "Traceback" not in output
    shutil.rmtree(workdir, ignore_errors=True)


def test_upstream_config_with_a_bad_listener_fails_closed():
    workdir = short_tempdir("toml")
    config = workdir / "dstack.toml"
    config.write_text('[external]\naddress = "0.0.0.0"\nport = "8090"\n')
    result = subprocess.run(
        [sys.executable, "-m", "dstack_core.cli", "serve", "--platform", "simulator",
         "--state-dir", str(workdir / "state"), "--socket", str(workdir / "s.sock"),
         "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "[external] needs an integer port" in result.stderr
    assert not os.path.exists(workdir / "s.sock")
    shutil.rmtree(workdir, ignore_errors=True)
