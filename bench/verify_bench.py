"""Verifications per second of the simulator's Attest envelope, against a dcap-qvl baseline.

Starts a simulator agent, takes one Attest envelope and the simulator's trust bundle, stops
the agent, then times in one process:

* baseline: ``dcap_qvl.verify_with_root_ca`` on the envelope's quote (signature, chain,
  QE identity and TCB only: what any DCAP verifier must pay);
* ``verify``: dstack_core's full verification of the envelope bytes (decode, every check:
  dcap-qvl, RTMR0-3 replay, runtime digests, app-info recomputation, binding);
* ``verify_evidence``: the same on already-decoded evidence;

then where the time beyond dcap-qvl goes: decoding (``load_evidence``: CBOR, the canonical
re-encoding, events, the quote), the ``tdx`` plugin's own work around dcap-qvl, and the
core's checks (replay, binding, identity, verdict). Figures are rates per CPU-second
measured in one run, the first three in alternating 50 ms slots, so that their ratios hold
on a loaded machine; the load average is printed with them.

Run: ``.venv/bin/python bench/verify_bench.py [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import time
import types
from collections.abc import Callable

import dcap_qvl
from dstack_tdx import qvl

from dstack_core.collateral import Collateral
from dstack_core.testing import AgentProcess, short_tempdir
from dstack_core.verify import VerifyOptions, default_host, load_evidence, verify, verify_evidence


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per CPU-second of this process of ``fn`` over about ``seconds`` (after a short
    warm-up). CPU time, not wall time: on a machine shared with other work, the time other
    processes take is not counted against either side of a ratio."""
    return rates({"fn": fn}, seconds)["fn"]


def rates(fns: dict[str, Callable[[], object]], seconds: float,
          slot: float = 0.05) -> dict[str, float]:
    """Calls per CPU-second of each of ``fns``, measured in alternating slots of about
    ``slot`` seconds for about ``seconds`` each, so that every one sees the same machine
    (a shared machine's load changes from second to second; measured one after the
    other, their ratio would carry that change)."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    counts = dict.fromkeys(fns, 0)
    cpu = dict.fromkeys(fns, 0.0)
    deadline = time.perf_counter() + seconds * len(fns)
    while time.perf_counter() < deadline:
        for name, fn in fns.items():
            started, wall = time.process_time(), time.perf_counter()
            done = 0
            while time.perf_counter() - wall < slot:
                fn()
                done += 1
            cpu[name] += time.process_time() - started
            counts[name] += done
    return {name: counts[name] / cpu[name] for name in fns}


def simulator_evidence() -> tuple[bytes, bytes, str]:
    """(Attest envelope, mock root CA DER, collateral JSON) from a fresh simulator agent."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from dstack_core.cli import main as cli

    agent = AgentProcess("simulator").start()
    out = short_tempdir("bench")
    try:
        status, body = agent.call("Attest", {"report_data": "62656e6368"})
        if status != 200:
            raise SystemExit(f"Attest failed: {body}")
        with contextlib.redirect_stdout(io.StringIO()):
            cli(
                [
                    "simulator",
                    "trust-bundle",
                    "--state-dir",
                    str(agent.state_dir),
                    "--out",
                    str(out),
                ]
            )
        root = x509.load_pem_x509_certificate((out / "root_ca.pem").read_bytes())
        return (
            bytes.fromhex(body["attestation"]),
            root.public_bytes(Encoding.DER),
            (out / "collateral.json").read_text(),
        )
    finally:
        agent.stop()
        shutil.rmtree(agent.workdir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()

    envelope, root_der, collateral_json = simulator_evidence()
    collateral = Collateral.from_json(collateral_json)
    now = int(time.time())
    options = VerifyOptions(now=now, root_ca_der=root_der, allow_simulator=True)
    evidence = load_evidence(envelope)
    result = verify(envelope, options, collateral)
    if not result.passed:
        raise SystemExit(f"the benchmark evidence does not verify: {result.reason}")
    quote = evidence.quote.raw
    qvl_collateral = collateral.to_qvl()

    plugin = default_host().get("tdx")
    load_before = os.getloadavg()[0]
    headline = rates(
        {
            "baseline": lambda: dcap_qvl.verify_with_root_ca(
                quote, qvl_collateral, root_der, now
            ),
            "full": lambda: verify(envelope, options, collateral),
            "decoded": lambda: verify_evidence(evidence, options, collateral),
        },
        args.seconds,
    )
    baseline, full, decoded = headline["baseline"], headline["full"], headline["decoded"]
    decoding = rate(lambda: load_evidence(envelope), args.seconds)
    # The parts beyond dcap-qvl, each timed with dcap-qvl's answer replayed (its own cost is
    # the baseline's), so that the breakdown is not the difference of two noisy rates.
    answer = dcap_qvl.verify_with_root_ca(quote, qvl_collateral, root_der, now)
    real_qvl = qvl.dcap_qvl
    qvl.dcap_qvl = types.SimpleNamespace(verify_with_root_ca=lambda *_: answer)
    try:
        platform = rate(lambda: plugin.verify(evidence.report, collateral, options, None),
                        args.seconds)
        checks = rate(lambda: verify_evidence(evidence, options, collateral), args.seconds)
    finally:
        qvl.dcap_qvl = real_qvl

    print(
        f"simulator Attest envelope: {len(envelope)} bytes, quote v{evidence.quote.version}, "
        f"{len(evidence.event_log)} events; load average {load_before:.2f} -> "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(f"{'baseline dcap_qvl.verify_with_root_ca':<40} {baseline:9.0f} /s   1.00x")
    print(f"{'dstack_core.verify.verify (bytes)':<40} {full:9.0f} /s   {full / baseline:.2f}x")
    print(
        f"{'dstack_core.verify.verify_evidence':<40} {decoded:9.0f} /s   {decoded / baseline:.2f}x"
    )
    us = 1e6
    print(
        f"per verification beyond dcap-qvl: {us / full - us / baseline:.0f} us; alone: decoding "
        f"{us / decoding:.0f} us, the tdx plugin around dcap-qvl {us / platform:.0f} us, the "
        f"core's checks {us / checks - us / platform:.0f} us (the rest: caches and allocator "
        "shared with dcap-qvl)"
    )


if __name__ == "__main__":
    main()
