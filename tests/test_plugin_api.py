"""Plugin API stability: what docs/plugins/ shows a vendor importing keeps working.

The documented surface is scripts/plugin_reference.py's SURFACE and KIT_SURFACE; the
signatures it had are pinned in tests/data/plugin_api.json. A name may gain parameters with
defaults, never lose or rename one, or make one required; nothing may disappear. The docs'
code blocks import nothing outside the surface, and the reference in writing.md is current.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
PINNED = REPO / "tests" / "data" / "plugin_api.json"
PLUGIN_DOCS = (REPO / "docs" / "plugins" / "writing.md", REPO / "docs" / "plugins" / "testing.md")
CODE_BLOCK = re.compile(r"^```python[^\n]*\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plugin_reference", REPO / "scripts" / "plugin_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
SURFACE = {**GENERATOR.SURFACE, **GENERATOR.KIT_SURFACE}


def _documented_imports() -> set[tuple[str, str]]:
    """``(module, name)`` of every import in the plugin docs' Python code blocks."""
    found = set()
    for doc in PLUGIN_DOCS:
        for block in CODE_BLOCK.finditer(doc.read_text()):
            for node in ast.walk(ast.parse(block["body"])):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dstack_core"):
                    found.update((node.module, alias.name) for alias in node.names)
                elif isinstance(node, ast.Import):
                    found.update((a.name, "") for a in node.names if a.name.startswith("dstack_core"))
    return found


def _compatible(pinned: list[str], current: list[str]) -> list[str]:
    """Why ``current`` parameters break callers of ``pinned`` ones (empty: they do not).

    Parameters are written as the snapshot writes them: ``[prefix]name[=]`` with prefix
    ``/`` (positional-only), ``*`` (keyword-only), ``+`` (``*args``), ``**`` (``**kwargs``).
    """
    def split(param: str) -> tuple[str, str, bool]:
        bare = param.rstrip("=")
        name = bare.lstrip("/*+")
        return bare[: len(bare) - len(name)], name, param.endswith("=")

    old = {name: (prefix, default) for prefix, name, default in map(split, pinned)}
    new = {name: (prefix, default) for prefix, name, default in map(split, current)}
    problems = []
    for name, (prefix, default) in old.items():
        if name not in new:
            problems.append(f"parameter {name} was removed")
        elif new[name][0] != prefix:
            problems.append(f"parameter {name} changed kind")
        elif default and not new[name][1]:
            problems.append(f"parameter {name} lost its default")
    for name, (prefix, default) in new.items():
        if name not in old and not default and prefix not in ("+", "**"):
            problems.append(f"new parameter {name} has no default")
    positional_old = [n for p, n, _ in map(split, pinned) if p in ("", "/")]
    positional_new = [n for p, n, _ in map(split, current) if p in ("", "/")]
    if positional_new[: len(positional_old)] != positional_old:
        problems.append(f"positional order {positional_old} became {positional_new}")
    return problems


class TestImportSurface:
    @pytest.mark.parametrize(("module", "name"), sorted(
        (m, n) for m, names in SURFACE.items() for n in names))
    def test_documented_name_imports(self, module, name):
        """Every documented name imports from its documented module."""
        assert GENERATOR.resolve(module, name) is not None

    def test_docs_import_only_the_surface(self):
        """The plugin docs' code imports nothing that is not in the pinned surface."""
        unpinned = {
            (module, name) for module, name in _documented_imports()
            if name != "*" and name not in SURFACE.get(module, ()) and not (
                name == "" and module in SURFACE)
        }
        assert unpinned == set()

    def test_pinned_snapshot_covers_the_surface(self):
        """tests/data/plugin_api.json pins every documented name, and only those."""
        pinned = json.loads(PINNED.read_text())
        assert set(pinned) == {f"{m}:{n}" for m, names in SURFACE.items() for n in names}


class TestSignatures:
    def test_signatures_stay_compatible(self):
        """No documented name changed kind, and no parameter or method was removed, renamed,
        reordered or made required since the snapshot."""
        pinned = json.loads(PINNED.read_text())
        current = GENERATOR.snapshot()
        problems = []
        for key, old in pinned.items():
            new = current.get(key)
            if new is None:
                problems.append(f"{key}: gone")
                continue
            if new["kind"] != old["kind"]:
                problems.append(f"{key}: was a {old['kind']}, is a {new['kind']}")
                continue
            problems += [f"{key}: {p}" for p in _compatible(old.get("params", []),
                                                             new.get("params", []))]
            for method, params in old.get("methods", {}).items():
                if method not in new.get("methods", {}):
                    problems.append(f"{key}.{method}: gone")
                else:
                    problems += [f"{key}.{method}: {p}" for p in
                                 _compatible(params, new["methods"][method])]
        assert problems == []

    @pytest.mark.parametrize(("old", "new", "broken"), [
        (["a", "b="], ["a", "b=", "c="], False),
        (["a", "*b"], ["a", "*b", "*c="], False),
        (["a", "b"], ["a"], True),
        (["a", "b"], ["b", "a"], True),
        (["a", "b="], ["a", "b"], True),
        (["a"], ["a", "c"], True),
        (["*a"], ["*a", "*c"], True),
        (["a"], ["*a"], True),
    ])
    def test_compatibility_rule(self, old, new, broken):
        """The rule itself: additions with defaults are fine; removals, reorders, new
        required parameters and lost defaults are not."""
        assert bool(_compatible(old, new)) is broken


class TestReference:
    def test_reference_in_the_guide_is_current(self):
        """docs/plugins/writing.md carries exactly what scripts/plugin_reference.py generates."""
        result = subprocess.run([sys.executable, str(REPO / "scripts" / "plugin_reference.py"),
                                 "--check"], capture_output=True, text=True, timeout=120,
                                check=False)
        assert result.returncode == 0, result.stderr

    def test_reference_documents_every_public_type(self):
        """The reference has a section per value type and lists every key provider kind."""
        text = (REPO / "docs" / "plugins" / "writing.md").read_text()
        for name in ("RootKey", "KeyProvider", "PlatformConfig", "PlatformInfo", "Quote",
                     "PlatformEvidence", "Measurements", "TrustBundle"):
            assert f"#### `{name}`" in text
        for kind in ("`None` / `none`", "`Local` / `local-sgx`", "`Tpm` / `tpm`", "`Kms` / `kms`"):
            assert kind in text
