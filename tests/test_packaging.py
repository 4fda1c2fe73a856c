"""packaging/: the systemd units that replace upstream's guest-agent units one for one, the
dstack.toml they read, and docs/operations.md, which must describe every flag and key."""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

import pytest

from dstack_core.cli import build_parser
from dstack_core.config import _KEY_TYPES, load_settings

ROOT = Path(__file__).parent.parent
UNITS = ROOT / "packaging" / "systemd"
OPERATIONS = ROOT / "docs" / "operations.md"


def unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, with systemd's backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    values: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def test_units_replace_upstreams_one_for_one():
    """Upstream's image ships exactly these guest-agent units (os/common/rootfs)."""
    names = {str(p.relative_to(UNITS)) for p in UNITS.rglob("*") if p.is_file()}
    assert names == {
        "dstack-guest-agent.service",
        "dstack-guest-agent.socket",
        "docker.service.d/dstack-guest-agent.conf",
    }


def test_socket_unit_passes_dstack_then_tappd():
    socket_unit = unit(UNITS / "dstack-guest-agent.socket")
    assert socket_unit["Socket.ListenStream"] == ["/run/dstack.sock", "/run/tappd.sock"]


def test_service_unit_runs_a_valid_serve_command():
    """ExecStart parses with the real CLI; notify, watchdog and restart as upstream."""
    service = unit(UNITS / "dstack-guest-agent.service")
    (command,) = service["Service.ExecStart"]
    argv = shlex.split(command)
    assert argv[0].endswith("/dstack-agent")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.platform == "tdx"
    assert [str(p) for p in args.config] == ["/etc/dstack/dstack.toml", "/dstack/agent.json"]
    assert service["Service.Type"] == ["notify"]
    assert service["Service.WatchdogSec"] == ["30s"]
    assert service["Service.Restart"] == ["always"]
    assert service["Unit.Requires"] == ["dstack-guest-agent.socket"]
    assert "docker.service" in service["Unit.Before"][0]


def test_docker_waits_for_both_sockets():
    conf = unit(UNITS / "docker.service.d" / "dstack-guest-agent.conf")
    (wait,) = conf["Service.ExecStartPre"]
    assert "/var/run/dstack.sock" in wait and "/var/run/tappd.sock" in wait


def test_packaged_dstack_toml_maps_every_key(caplog):
    """The shipped /etc/dstack/dstack.toml loads without unknown keys."""
    with caplog.at_level(logging.INFO):
        settings = load_settings(
            {"platform": "tdx"}, config_file=[ROOT / "packaging" / "dstack.toml"], environ={}
        )
    assert "unknown keys" not in caplog.text
    assert settings.appkeys == Path("/dstack/.host-shared/.appkeys.json")
    assert settings.socket == Path("/var/run/dstack/dstack.sock")
    assert settings.tappd_socket == Path("/var/run/dstack/tappd.sock")
    assert settings.external_listen == ("0.0.0.0", 8090)


def serve_flags() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    serve = subparsers.choices["serve"]  # type: ignore[attr-defined]
    return {s for a in serve._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


@pytest.mark.parametrize("flag", sorted(serve_flags()))
def test_operations_doc_describes_every_flag(flag):
    assert f"`{flag}" in OPERATIONS.read_text(), f"docs/operations.md does not describe {flag}"


@pytest.mark.parametrize("key", sorted(_KEY_TYPES))
def test_operations_doc_describes_every_config_key(key):
    assert f"`{key}`" in OPERATIONS.read_text(), f"docs/operations.md does not describe {key}"
