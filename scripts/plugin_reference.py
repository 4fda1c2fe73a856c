#!/usr/bin/env python3
"""The plugin API reference in docs/plugins/writing.md, generated from the docstrings.

The documented import surface of dstack-core for platform plugins is :data:`SURFACE` (what
the reference describes) and :data:`KIT_SURFACE` (the test kit, described in
docs/plugins/testing.md). tests/test_plugin_api.py pins both: every name imports, the docs
import nothing else, signatures stay compatible with tests/data/plugin_api.json, and the
reference below the marker in writing.md is what this script generates.

Usage: ``scripts/plugin_reference.py`` rewrites the reference; ``--check`` only says whether
it is current (exit 1 if not); ``--pin`` rewrites tests/data/plugin_api.json (do that only
when the API grew compatibly, or deliberately broke).
"""

from __future__ import annotations

import ast
import datetime
import importlib
import inspect
import json
import re
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

REPO: Final = Path(__file__).resolve().parent.parent
GUIDE: Final = REPO / "docs" / "plugins" / "writing.md"
PINNED: Final = REPO / "tests" / "data" / "plugin_api.json"
BEGIN: Final = "<!-- BEGIN GENERATED REFERENCE (scripts/plugin_reference.py) -->"
END: Final = "<!-- END GENERATED REFERENCE -->"

TYPES: Final = (
    "PlatformInfo", "PlatformConfig", "Quote", "PlatformEvidence", "Measurements", "RootKey",
    "KeyProvider", "TrustBundle",
)
VERIFIER_TYPES: Final = (
    "VerifierInfo", "PlatformReport", "Registers", "PlatformVerification", "CheckResult",
    "VerifyOptions", "TrustInputs",
)
ERRORS: Final = (
    "DstackError", "InvalidRequest", "PlatformBusy", "PlatformUnsupported", "PlatformError",
    "ConfigurationError", "StateError", "EvidenceError", "PluginError", "StorageError",
)
SURFACE: Final[Mapping[str, tuple[str, ...]]] = {
    "dstack_core": ("hookimpl", "nonblocking", "__version__", "certs", *TYPES, *ERRORS),
    "dstack_core.types": (
        "REPORT_DATA_LENGTH", "RTMR_LENGTH", "KEY_PROVIDER_KINDS", "EvidenceFormat", *TYPES,
    ),
    "dstack_core.eventlog": (
        "TdxEvent", "RuntimeEvent", "extend", "replay", "replay_rtmrs", "runtime_event",
    ),
    "dstack_core.certs": (
        "new_tls_key", "derive_p256_key", "new_app_ca", "private_key_pem", "cert_pem",
        "CertificateAuthority",
    ),
    "dstack_core.keys": ("derive_key",),
    "dstack_core.statefile": ("atomic_write", "read_or_create_secret"),
    "dstack_core.inputs": ("app_compose_document", "sys_config_document", "document_text"),
    "dstack_core.quote": ("TdReport", "TdxQuote"),
    "dstack_core.mockpki": (
        "MockIntelPki", "SEED_SIZE", "MOCK_TD_ATTRIBUTES", "MOCK_XFAM", "SIMULATOR_USER_DATA",
        "mock_td_report",
    ),
    "dstack_core.snp": ("SnpReport", "build_report", "encode_signature"),
    "dstack_core.mockpki_amd": ("MockAmdPki", "MOCK_PRODUCTS", "mock_chip_id"),
    "dstack_core.verify": (*VERIFIER_TYPES, "CORE_CHECKS"),
}
"""What a platform (or verifier) plugin may import from dstack-core, by module, in
reference order."""

KIT_SURFACE: Final[Mapping[str, tuple[str, ...]]] = {
    "dstack_core.testing": ("AgentProcess", "short_tempdir", "uds_request"),
    "dstack_core.testing.pytest_plugin": (
        "PlatformEnv", "PlatformAgent", "configured_platform", "conformance_policy",
        "DEFAULT_APP_COMPOSE", "DEFAULT_SYS_CONFIG",
    ),
    "dstack_core.testing.pytest_hooks": ("pytest_dstack_platform_env",),
    "dstack_core.testing.conformance": ("bound_report_data", "TestAgent"),
    "dstack_core.testing.fake_tee": ("FakeTdxMachine", "FakeSnpMachine", "open_machine"),
    "dstack_core.testing.fake_kms": ("FakeKms",),
    "dstack_core.testing.abuse": ("ConnectionFlood", "Prober", "MALFORMED_REQUESTS"),
    "dstack_core.testing.logscan": ("register_secret", "log_file", "record_output"),
}
"""The test kit's documented surface (docs/plugins/testing.md)."""

MODULE_NOTES: Final[Mapping[str, str]] = {
    "dstack_core": "the hook marker, the error classes and the value types",
    "dstack_core.types": "the values that cross the contract, and their constants",
    "dstack_core.eventlog": "boot and runtime events, RTMR arithmetic",
    "dstack_core.certs": "key material for the app CA that issues GetTlsKey certificates",
    "dstack_core.keys": "key derivation",
    "dstack_core.statefile": "durable state below `config.state_dir`",
    "dstack_core.inputs": "development defaults of the app's inputs",
    "dstack_core.quote": "TDX quotes (layouts and parser)",
    "dstack_core.mockpki": "a mock Intel DCAP PKI for simulated TDX-format platforms",
    "dstack_core.snp": "SEV-SNP reports (layout and parser)",
    "dstack_core.mockpki_amd": "a mock AMD SEV-SNP hierarchy for simulated SNP-format platforms",
    "dstack_core.verify": "the values of the verifier contract (types above)",
}
KERNEL_MODULES: Final = (
    "dstack_core.sysio", "dstack_core.tsm", "dstack_core.platform_options",
    "dstack_core.kernel_errors", "dstack_core.ccel",
)

_ROLE: Final = re.compile(r":(?:class|func|meth|data|attr|mod|exc):`~?(?:[\w.]*\.)?([^`]+)`")
_LITERAL: Final = re.compile(r"``([^`]+)``")
_IVAR: Final = re.compile(r"^:ivar (\w+):\s*(.*)$")


def _text(docstring: str) -> str:
    return _LITERAL.sub(r"`\1`", _ROLE.sub(r"`\1`", docstring))


def _paragraphs(obj: object) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    return [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]


def _summary(obj: object) -> str:
    """The docstring's prose before the field and parameter lists."""
    kept = [p for p in _paragraphs(obj) if not p.startswith(":") and not p.startswith("..")]
    return _text(" ".join(kept[:2]))


def _ivars(cls: type) -> dict[str, str]:
    doc = inspect.getdoc(cls) or ""
    found: dict[str, str] = {}
    name = None
    for line in doc.splitlines():
        match = _IVAR.match(line.strip())
        if match:
            name = match[1]
            found[name] = match[2]
        elif name is not None and line.startswith("    ") and line.strip():
            found[name] += " " + line.strip()
        else:
            name = None
    return {k: _text(v) for k, v in found.items()}


def _value(name: str, value: Any) -> str:
    if isinstance(value, datetime.datetime):
        return f"datetime({value.isoformat()})"
    if isinstance(value, bytes) and len(value) > 8 and not any(value):
        return f"bytes({len(value)})"
    if name == "mode" and isinstance(value, int):
        return oct(value)
    return repr(value)


def _signature(obj: Callable[..., Any]) -> str:
    """``(a: T, *, b: U = default) -> R`` with annotations as written in the source."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parts: list[str] = []
    star = False
    for param in signature.parameters.values():
        if param.name in ("self", "cls"):
            continue
        if param.kind is param.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = "*" if param.kind is param.VAR_POSITIONAL else ""
        text += "**" if param.kind is param.VAR_KEYWORD else ""
        text += param.name
        if param.kind is param.VAR_POSITIONAL:
            star = True
        if param.annotation is not param.empty:
            text += f": {_type_name(param.annotation)}"
        if param.default is not param.empty:
            text += f" = {_value(param.name, param.default)}"
        parts.append(text)
    returns = signature.return_annotation
    arrow = "" if returns is signature.empty else f" -> {_type_name(returns)}"
    return f"({', '.join(parts)}){arrow}"


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", str(annotation))


def _default(field: attrs.Attribute[Any]) -> str:
    if field.default is attrs.NOTHING:
        return "required"
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return "empty"
    return f"`{_value(field.name, field.default)}`"


def _type_section(module: str, name: str) -> list[str]:
    obj = getattr(importlib.import_module(module), name)
    lines = [f"#### `{name}`", "", _summary(obj), ""]
    if attrs.has(obj):
        notes = _ivars(obj)
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for field in attrs.fields(obj):
            if field.name.startswith("_"):
                continue
            meaning = notes.get(field.name, "").replace("|", "\\|")
            lines.append(
                f"| `{field.name}` | `{_type_name(field.type)}` | {_default(field)} | {meaning} |"
            )
        lines.append("")
    if name == "KeyProvider":
        kinds = importlib.import_module("dstack_core.types").KEY_PROVIDER_KINDS
        lines += [
            "Kinds (`KEY_PROVIDER_KINDS`: `kind` and the `name` it has in the boot event): "
            + ", ".join(f"`{k}` / `{v}`" for k, v in kinds.items()) + ". "
            + _text(_constant_doc("dstack_core.types", "KEY_PROVIDER_KINDS")),
            "",
        ]
    return lines


def _constant_doc(module: str, name: str) -> str:
    """A module constant's docstring (the string literal right after its assignment)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    for statement, following in zip(tree.body, tree.body[1:], strict=False):
        targets = (
            [statement.target] if isinstance(statement, ast.AnnAssign)
            else statement.targets if isinstance(statement, ast.Assign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                return " ".join(str(following.value.value).split())
            return ""
    return ""


def _helper_lines(module: str, name: str) -> list[str]:
    obj = getattr(importlib.import_module(module), name)
    if inspect.ismodule(obj):
        return [f"- `{name}`: the module `{obj.__name__}` (below)."]
    if inspect.isclass(obj):
        lines = [f"- `{name}`: {_summary(obj)}"]
        for member_name, member in inspect.getmembers(obj):
            if member_name.startswith("_") or not (
                inspect.isfunction(member) or inspect.ismethod(member)
            ):
                continue
            lines.append(f"  - `{member_name}{_signature(member)}`: {_summary(member)}")
        return lines
    if typing.get_origin(obj) is not None:
        note = _text(_constant_doc(module, name))
        return [f"- `{name}` = `{obj!r}`".replace("typing.", "") + (f": {note}" if note else "")]
    if callable(obj):
        return [f"- `{name}{_signature(obj)}`: {_summary(obj)}"]
    note = _constant_doc(module, name)
    return [f"- `{name}` = `{obj!r}`" + (f": {_text(note)}" if note else "")
            if isinstance(obj, (int, str, bytes)) and len(repr(obj)) < 60
            else f"- `{name}`" + (f": {_text(note)}" if note else "")]


def reference() -> str:
    """The generated reference section (without the markers)."""
    lines = [
        "",
        (
            "Generated from the docstrings by `scripts/plugin_reference.py`; "
            "`tests/test_plugin_api.py` fails when it is stale, when a name below stops "
            "importing, or when a signature changes incompatibly. Everything here is public "
            "API: it keeps working across releases."
        ),
        "",
        "### Types",
        "",
        (
            "`from dstack_core import ...`; the hooks take and return these (see "
            "[hooks.md](hooks.md)). All are frozen attrs classes with keyword-only fields."
        ),
        "",
    ]
    for name in TYPES:
        lines += _type_section("dstack_core.types", name)
    lines += [
        "### Verifier types",
        "",
        (
            "`from dstack_core.verify import ...`; the verifier hooks take and return these "
            "(see [hooks.md](hooks.md#verifier-hooks))."
        ),
        "",
    ]
    for name in VERIFIER_TYPES:
        lines += _type_section("dstack_core.verify", name)
    lines += ["### Errors", "", "`from dstack_core import ...`:", ""]
    for name in ERRORS:
        error = getattr(importlib.import_module("dstack_core"), name)
        status = getattr(error, "http_status", None)
        code = getattr(error, "code", None)
        lines.append(f"- `{name}` ({status}, `{code}`): {_summary(error)}")
    lines += ["", "### Helpers", ""]
    for module, names in SURFACE.items():
        if module == "dstack_core":
            continue
        helpers = [n for n in names if not (module == "dstack_core.types" and n in TYPES)
                   and not (module == "dstack_core.verify" and n in VERIFIER_TYPES)]
        lines += [f"`{module}`: {MODULE_NOTES[module]}.", ""]
        for name in helpers:
            lines += _helper_lines(module, name)
        lines.append("")
    lines += [
        (
            "Kernel-facing plugins (like `tdx` and `sev-snp-stub`) may also build on these "
            "modules; their docstrings are their reference:"
        ),
        "",
    ]
    for module in KERNEL_MODULES:
        lines.append(f"- `{module}`: {_summary(importlib.import_module(module))}")
    lines.append("")
    return "\n".join(lines)


def resolve(module: str, name: str) -> Any:
    """``from module import name``: an attribute, or a submodule."""
    imported = importlib.import_module(module)
    try:
        return getattr(imported, name)
    except AttributeError:
        return importlib.import_module(f"{module}.{name}")


def _kind(obj: object) -> str:
    if typing.get_origin(obj) is not None:
        return "constant"
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    return "function" if callable(obj) else "constant"


_PREFIX: Final = {
    "POSITIONAL_ONLY": "/", "POSITIONAL_OR_KEYWORD": "", "VAR_POSITIONAL": "+",
    "KEYWORD_ONLY": "*", "VAR_KEYWORD": "**",
}


def _params(obj: Callable[..., Any]) -> list[str]:
    """Each parameter as ``[prefix]name[=]``: ``/`` positional-only, ``*`` keyword-only,
    ``+`` for ``*args``, ``**`` for ``**kwargs``; a trailing ``=`` when it has a default."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [
        _PREFIX[p.kind.name] + p.name + ("=" if p.default is not inspect.Parameter.empty else "")
        for p in signature.parameters.values() if p.name not in ("self", "cls")
    ]


def snapshot() -> dict[str, Any]:
    """Every documented name: its kind and, for callables, its parameters (name, kind,
    whether it has a default); for classes also their public methods' (not a conformance
    class's tests: which tests the suite has is not API)."""
    doc: dict[str, Any] = {}
    for surface in (SURFACE, KIT_SURFACE):
        for module, names in surface.items():
            for name in names:
                obj = resolve(module, name)
                entry: dict[str, Any] = {"kind": _kind(obj)}
                if entry["kind"] in ("class", "function"):
                    entry["params"] = _params(obj)
                if entry["kind"] == "class":
                    entry["methods"] = {
                        m: _params(member) for m, member in inspect.getmembers(obj)
                        if not m.startswith(("_", "test_")) and (inspect.isfunction(member)
                                                                 or inspect.ismethod(member))
                    }
                doc[f"{module}:{name}"] = entry
    return doc


def rendered_guide() -> str:
    text = GUIDE.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if not rest:
        raise SystemExit(f"{GUIDE} has no {BEGIN!r} marker")
    return f"{head}{BEGIN}\n{reference()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    if "--pin" in argv:
        entries = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                   for k, v in sorted(snapshot().items())]
        PINNED.write_text("{\n" + ",\n".join(entries) + "\n}\n")
        return 0
    guide = rendered_guide()
    if "--check" in argv:
        if guide != GUIDE.read_text():
            print(f"{GUIDE} reference is stale: run scripts/plugin_reference.py", file=sys.stderr)
            return 1
        return 0
    GUIDE.write_text(guide)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
