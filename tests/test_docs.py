"""Documentation that must stay in step with the code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

from dstack_core import hookspecs, verifier_hookspecs

DOCS = Path(__file__).parent.parent / "docs"
HOOK_HEADING = re.compile(r"^### `(?P<signature>(?P<name>\w+)\(.*\) -> .+)`$", re.M)
HOOK_FLAGS = re.compile(r"- firstresult: (?P<first>yes|no); required: (?P<required>yes|no)")


VERIFIER_PART = "\n# Verifier hooks\n"


def spec_functions(specs: ModuleType = hookspecs) -> dict[str, object]:
    return {
        name: getattr(specs, name)
        for name in specs.__all__
        if hasattr(getattr(specs, name), f"{specs.PROJECT_NAME}_spec")
    }


def signature_of(fn) -> str:
    annotations = fn.__annotations__
    params = ", ".join(f"{p}: {annotations[p]}" for p in inspect.signature(fn).parameters)
    return f"{fn.__name__}({params}) -> {annotations['return']}"


def documented_hooks(specs: ModuleType = hookspecs) -> dict[str, tuple[str, str, str]]:
    """The hooks hooks.md documents for ``specs``: the platform part, or the verifier part
    (after the ``# Verifier hooks`` heading)."""
    platform, _, verifier = (DOCS / "plugins" / "hooks.md").read_text().partition(VERIFIER_PART)
    text = verifier if specs is verifier_hookspecs else platform
    hooks = {}
    for match in HOOK_HEADING.finditer(text):
        flags = HOOK_FLAGS.search(text, match.end())
        assert flags is not None, f"no flags line after {match['name']}"
        hooks[match["name"]] = (match["signature"], flags["first"], flags["required"])
    return hooks


CONTRACTS = pytest.mark.parametrize("specs", [hookspecs, verifier_hookspecs],
                                    ids=["platform", "verifier"])


class TestHooksDoc:
    @CONTRACTS
    def test_every_hook_is_documented_exactly(self, specs):
        """hooks.md lists every hook spec of each contract (platform, then verifier) under
        its exact signature, and nothing else."""
        functions = spec_functions(specs)
        documented = documented_hooks(specs)
        assert set(documented) == set(functions)
        for name, fn in functions.items():
            assert documented[name][0] == signature_of(fn)

    @CONTRACTS
    def test_flags_match_specs(self, specs):
        """hooks.md states firstresult and required/optional as the specs define them."""
        for name, fn in spec_functions(specs).items():
            opts = getattr(fn, f"{specs.PROJECT_NAME}_spec")
            _, first, required = documented_hooks(specs)[name]
            assert (first == "yes") == opts["firstresult"], name
            assert (required == "yes") == (name in specs.REQUIRED_HOOKS), name

    @CONTRACTS
    def test_every_spec_has_a_contract_docstring(self, specs):
        """Each hook spec's docstring states what it returns or raises and since when."""
        for name, fn in spec_functions(specs).items():
            doc = fn.__doc__ or ""
            assert ".. versionadded::" in doc, name
            assert ":returns:" in doc or ":raises" in doc or "-> None" in signature_of(fn), name


class TestReadme:
    def test_starts_with_the_two_commands(self):
        """The README opens with the run and test commands, and both scripts exist."""
        readme = (DOCS.parent / "README.md").read_text()
        block = readme.split("```sh", 1)[1].split("```", 1)[0]
        commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
        assert commands == ["scripts/serve-simulator", "scripts/test"]
        for command in commands:
            assert (DOCS.parent / command).stat().st_mode & 0o111
        ci = (DOCS.parent / ".ci" / "run").read_text()
        assert "scripts/test" in ci


class TestSecurityDoc:
    def test_policy_examples_are_valid(self):
        """Every TOML example in docs/security.md is a policy the agent accepts."""
        from dstack_core.policy import parse_policy
        from dstack_core.server.app import API_METHODS

        text = (DOCS / "security.md").read_text()
        examples = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
        assert len(examples) >= 4
        for example in examples:
            parse_policy(example, source="docs/security.md", methods=API_METHODS)


class TestCommandLine:
    def test_readme_lists_every_flag(self):
        """The README's command-line block names every serve flag and every command."""
        from dstack_core.cli import build_parser

        readme = (DOCS.parent / "README.md").read_text()
        block = readme.split("## Command line", 1)[1].split("```", 2)[1]
        commands = build_parser()._subparsers._group_actions[0].choices
        for name in commands:
            assert f"dstack-agent {name}" in block, name
        for action in commands["serve"]._actions:
            flags = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            assert not flags or any(f in block for f in flags), flags
