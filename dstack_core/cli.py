"""``dstack-agent``: serve the agent, list platforms, publish a platform's trust bundle.

Errors the user can fix (configuration, plugins, evidence) are printed as one line on
stderr with exit status 2; there is no traceback unless ``--debug`` is given (before or
after the command: ``dstack-agent --debug serve ...`` and ``dstack-agent serve ... --debug``
are the same).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import __version__, cli_audit, cli_eventlog
from .cli_verify import BUNDLE_COLLATERAL, BUNDLE_OS_IMAGE_POLICY, BUNDLE_ROOT
from .cli_verify import register as register_verify
from .config import PLATFORM_ENV, ConnectionLimits, load_settings
from .errors import ConfigurationError, DstackError
from .platform import Platform
from .plugins import installed_platforms, load_platform
from .statefile import atomic_write

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


def _platform_option(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dstack-agent",
        description="The dstack guest agent: keys, TLS certificates, quotes, runtime "
        "measurements and attestations over a Unix socket, on a pluggable TEE platform.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the agent",
        description="Run the agent on one explicitly selected platform. Start-up fails "
        "closed: an unknown or broken platform stops it; there is no fallback.",
    )
    serve.add_argument(
        "--platform", help=f"platform plugin name (or {PLATFORM_ENV}, or 'platform' in --config)"
    )
    serve.add_argument("--socket", type=Path, help="Unix socket path (default /var/run/dstack.sock)")
    serve.add_argument("--socket-mode", help="socket file permissions, octal (default 0660)")
    serve.add_argument(
        "--state-dir", type=Path, help="durable state directory (default /var/lib/dstack-core)"
    )
    serve.add_argument("--appkeys", type=Path, help="upstream-format appkeys.json")
    serve.add_argument("--app-compose", type=Path, help="app-compose.json (default in state dir)")
    serve.add_argument("--sys-config", type=Path, help="sys-config.json (default in state dir)")
    serve.add_argument("--runtime-log", type=Path, help="runtime event log (default in state dir)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="also serve on this TCP address")
    serve.add_argument(
        "--tappd-socket", type=Path, metavar="PATH",
        help="serve the legacy Tappd API on its own Unix socket (upstream's tappd.sock)",
    )
    serve.add_argument(
        "--external-listen", metavar="HOST:PORT",
        help="serve upstream's external port (Worker.Info/Version/GetAttestationForAppKey, "
        "/metrics, status page) on this TCP address; never key-bearing methods",
    )
    serve.add_argument(
        "--attestation-format", choices=("dstack-core", "upstream"),
        help="what Attest and RA-TLS certificates carry: our CBOR envelope (default) or "
        "upstream's V0/V1 format",
    )
    serve.add_argument(
        "--kms-timeout", type=float, metavar="SECONDS",
        help="bound on one KMS SignCert exchange (default 10)",
    )
    serve.add_argument(
        "--max-body-size", type=int, help="request body limit in bytes (default 10 MiB)"
    )
    limits = ConnectionLimits()
    serve.add_argument(
        "--max-connections", type=int, metavar="N",
        help=f"client connections open at once (default {limits.max_connections}, "
        "lowered to fit the open-file limit)",
    )
    for key, what in (
        ("idle_timeout", "a connection may wait for its next request"),
        ("header_timeout", "a client may take to send a request head"),
        ("body_timeout", "a client may take to send a request body"),
        ("send_timeout", "an answer may wait for a client that reads none of it"),
    ):
        serve.add_argument(
            f"--{key.replace('_', '-')}", type=float, metavar="SECONDS",
            help=f"seconds {what} (default {getattr(limits, key):g})",
        )
    serve.add_argument(
        "--platform-option",
        action="append",
        type=_platform_option,
        default=[],
        metavar="KEY=VALUE",
        help="platform-specific setting (repeatable)",
    )
    serve.add_argument(
        "--reset-state",
        action="store_true",
        default=None,
        help="discard the platform's durable state (keys, registers, event log) first",
    )
    serve.add_argument(
        "--policy", type=Path, metavar="FILE",
        help="caller policy (TOML): who may call which method (docs/security.md)",
    )
    serve.add_argument(
        "--audit-log", type=Path, metavar="FILE",
        help="append a hash-chained JSON line per key-bearing or measurement-changing call "
        "and per denial",
    )
    serve.add_argument(
        "--allow-missing-verifier",
        action="store_true",
        default=None,
        help="start even when no verifier plugin for the platform's evidence format is "
        "installed (an image that deliberately leaves the verifier out)",
    )
    serve.add_argument(
        "--config", type=Path, action="append",
        help="JSON or TOML config file, ours or upstream's dstack.toml (repeatable; later "
        "files override earlier ones)",
    )
    serve.set_defaults(func=_cmd_serve)

    platforms = commands.add_parser(
        "platforms", help="list installed platform plugins", description="List installed "
        "platform plugins (entry-point group dstack_core.platforms) without importing them."
    )
    platforms.add_argument("--json", action="store_true", help="print JSON")
    platforms.set_defaults(func=_cmd_platforms)

    verifiers = commands.add_parser(
        "verifiers", help="list installed verifier plugins", description="List installed "
        "verifier plugins (entry-point group dstack_core.verifiers, one per evidence format) "
        "with their platform checks and options; --json also imports and checks each."
    )
    verifiers.add_argument("--json", action="store_true", help="print JSON")
    verifiers.set_defaults(func=_cmd_verifiers)

    bundle = commands.add_parser(
        "trust-bundle",
        help="write a platform's trust anchors for verifiers",
        description="Write the trust anchors a verifier needs for a platform's evidence: "
        f"{BUNDLE_ROOT} (the root certificate), {BUNDLE_COLLATERAL} (the collateral in the "
        f"evidence format's JSON form) and, when the platform has one, {BUNDLE_OS_IMAGE_POLICY}"
        ", as the platform's trust_bundle hook publishes them. A "
        "platform that publishes none (hardware, whose evidence verifies against the vendor's "
        "roots) writes nothing and says so. Safe while an agent is serving from the same "
        "state dir.",
    )
    bundle.add_argument(
        "--platform", help=f"platform plugin name (or {PLATFORM_ENV})"
    )
    _bundle_arguments(bundle)
    bundle.add_argument(
        "--platform-option",
        action="append",
        type=_platform_option,
        default=[],
        metavar="KEY=VALUE",
        help="platform-specific setting, as serve takes it (repeatable)",
    )
    bundle.set_defaults(func=_cmd_trust_bundle)

    simulator = commands.add_parser(
        "simulator", help="simulator tools", description="Tools for the simulator platform."
    )
    sim_commands = simulator.add_subparsers(dest="sim_command", metavar="COMMAND", required=True)
    sim_bundle = sim_commands.add_parser(
        "trust-bundle",
        help="write the simulator's mock Intel root CA, collateral and OS image policy",
        description=f"Write {BUNDLE_ROOT} and {BUNDLE_COLLATERAL} (dcap-qvl QuoteCollateralV3 "
        "JSON) for the mock Intel PKI that signs the simulator's quotes, and "
        f"{BUNDLE_OS_IMAGE_POLICY} (the simulated OS image's MRTD and RTMR0-2, see "
        "docs/verify.md); the same as 'dstack-agent trust-bundle --platform simulator'. Safe "
        "while an agent is serving from the same state dir.",
    )
    _bundle_arguments(sim_bundle)
    sim_bundle.set_defaults(func=_cmd_trust_bundle, platform="simulator", platform_option=[])
    register_verify(commands)
    cli_eventlog.register(commands)
    cli_audit.register(commands)
    _debug_everywhere(parser)
    return parser


def _bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, required=True, help="the agent's state dir")
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``--debug`` after any (sub)command too, not only before the first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument(
                    "--debug", action="store_true", default=argparse.SUPPRESS,
                    help="verbose logs and tracebacks (also accepted before the command)",
                )
                _debug_everywhere(sub)


@contextlib.contextmanager
def gc_paused_and_frozen() -> Iterator[None]:
    """Pause the cyclic GC for the block, then leave what it made out of later collections.

    The server's imports make most of what the agent keeps until it exits (modules,
    classes, the methods attrs generates) and almost no garbage, yet the cyclic GC would
    walk that growing heap again and again while it is made: about 6% of their CPU.
    Frozen (as a pre-forking server does), it is not walked by later collections either.
    The GC is on again afterwards, whatever happened in the block.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _cmd_serve(args: argparse.Namespace) -> int:
    with gc_paused_and_frozen():
        from .server import serve

    flags = {
        "platform": args.platform,
        "socket": args.socket,
        "socket_mode": args.socket_mode,
        "state_dir": args.state_dir,
        "appkeys": args.appkeys,
        "app_compose": args.app_compose,
        "sys_config": args.sys_config,
        "runtime_log": args.runtime_log,
        "listen": args.listen,
        "tappd_socket": args.tappd_socket,
        "external_listen": args.external_listen,
        "attestation_format": args.attestation_format,
        "kms_timeout": args.kms_timeout,
        "max_body_size": args.max_body_size,
        "max_connections": args.max_connections,
        "idle_timeout": args.idle_timeout,
        "header_timeout": args.header_timeout,
        "body_timeout": args.body_timeout,
        "send_timeout": args.send_timeout,
        "platform_options": dict(args.platform_option),
        "reset_state": args.reset_state,
        "policy": args.policy,
        "audit_log": args.audit_log,
        "allow_missing_verifier": args.allow_missing_verifier,
    }
    settings = load_settings(flags, config_file=args.config)
    asyncio.run(serve(settings))
    return 0


def _cmd_platforms(args: argparse.Namespace) -> int:
    found = installed_platforms()
    if args.json:
        print(json.dumps([{"name": p.name, "value": p.value, "distribution": p.distribution}
                          for p in found], indent=2))
    elif not found:
        print("no platform plugins installed (entry-point group dstack_core.platforms)")
    else:
        for p in found:
            print(f"{p.name:<16} {p.value:<40} {p.distribution}")
    return 0


def _cmd_verifiers(args: argparse.Namespace) -> int:
    from .verify import default_host

    host = default_host()
    loaded = host.load_all()
    if args.json:
        print(json.dumps([
            {
                "evidence_format": v.evidence_format,
                "value": v.installed.value,
                "distribution": v.installed.distribution,
                "version": v.installed.version,
                "checks": list(v.info.checks),
                "authenticated_by": list(v.info.authenticated_by),
                "options": dict(v.info.options),
                "description": v.info.description,
            }
            for v in loaded
        ], indent=2))
    elif not loaded:
        print("no verifier plugins installed (entry-point group dstack_core.verifiers)")
    else:
        for v in loaded:
            print(f"{v.evidence_format:<12} {v.installed.value:<44} {v.plugin}")
            print(f"{'':<12} checks: {', '.join(v.info.checks)}")
            for key, meaning in sorted(v.info.options.items()):
                print(f"{'':<12} --verifier-option {v.evidence_format}:{key}=...  {meaning}")
    return 0


def _cmd_trust_bundle(args: argparse.Namespace) -> int:
    name = args.platform or os.environ.get(PLATFORM_ENV)
    platform = Platform.from_plugin_manager(load_platform(name))
    bundle = platform.trust_bundle_sync(args.state_dir, dict(args.platform_option))
    if bundle is None:
        print(
            f"platform {platform.name} publishes no trust bundle: its evidence verifies "
            f"against the hardware vendor's roots; nothing written to {args.out}"
        )
        return 0
    files = {BUNDLE_ROOT: bundle.root_ca_pem, BUNDLE_COLLATERAL: bundle.collateral_json.encode()}
    if bundle.os_image_policy_json is not None:
        files[BUNDLE_OS_IMAGE_POLICY] = bundle.os_image_policy_json.encode()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            atomic_write(args.out / name, content, mode=0o644)
    except OSError as exc:
        raise ConfigurationError(f"cannot write the trust bundle: {exc}") from None
    print("wrote " + ", ".join(str(args.out / name) for name in files))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except DstackError as exc:
        if args.debug:
            raise
        print(f"dstack-agent: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
