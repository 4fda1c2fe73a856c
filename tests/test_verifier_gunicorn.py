"""The documented multi-core deployment: the verifier under gunicorn's aiohttp worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dstack_core.testing import short_tempdir
from dstack_core.testing.logscan import log_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/verify", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def gunicorn_verifier(agent):
    """gunicorn with two aiohttp workers, configured only through DSTACK_VERIFIER_* variables."""
    bundle_dir = short_tempdir("gbundle")
    subprocess.run([sys.executable, "-m", "dstack_core.cli", "simulator", "trust-bundle",
                    "--state-dir", str(agent.state_dir), "--out", str(bundle_dir)], check=True,
                   capture_output=True, timeout=60)
    port = free_port()
    env = {
        **os.environ,
        "DSTACK_VERIFIER_COLLATERAL": str(bundle_dir / "collateral.json"),
        "DSTACK_VERIFIER_ROOT_CA": str(bundle_dir / "root_ca.pem"),
        "DSTACK_VERIFIER_ALLOW_SIMULATOR": "1",
        # The simulator's OS image: without a policy, is_valid stays false (upstream's rule).
        "DSTACK_VERIFIER_OS_IMAGE_POLICY": str(bundle_dir / "os_image_policy.json"),
    }
    log_path = log_file("gunicorn")
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("gunicorn")), "dstack_core.server.verifier:app_from_env",
         "--worker-class", "aiohttp.GunicornWebWorker", "--workers", "2",
         "--bind", f"127.0.0.1:{port}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(log_path.read_text())
    yield port
    proc.terminate()
    proc.wait(15)
    log.close()


class TestGunicorn:
    def test_parallel_verifications_across_workers(self, agent, gunicorn_verifier):
        """Simulator attestations verify through gunicorn workers; a tampered one does not."""
        evidence = [agent.call("Attest", {"report_data": f"{i:02x}"})[1]["attestation"] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda a: post(gunicorn_verifier, {"attestation": a}), evidence))
        assert all(status == 200 and body["is_valid"] for status, body in results)
        assert all(body["simulated"] is True for _, body in results)
        quote_at = evidence[0].index("0400020081")
        tampered = evidence[0][: quote_at + 20] + ("0" if evidence[0][quote_at + 20] != "0" else "1") + evidence[0][quote_at + 21 :]
        status, body = post(gunicorn_verifier, {"attestation": tampered})
        assert status == 200 and body["is_valid"] is False
