"""The ``--platform-option`` helpers platform plugins share (``dstack_core.platform_options``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from dstack_core.errors import ConfigurationError
from dstack_core.platform_options import (
    ALLOW_FAKE_KERNEL_ENV,
    check_known,
    open_sysio,
    parse_flag,
    parse_root,
    parse_seconds,
    parse_sysio,
)
from dstack_core.sysio import OsSysIO, SysIO


class TestParsers:
    def test_check_known(self):
        """Unknown keys are refused, naming them and the known ones, sorted."""
        check_known("demo", {"root": "/"}, {"root", "sysio"})
        with pytest.raises(ConfigurationError) as caught:
            check_known("demo", {"zeta": "1", "alpha": "2", "root": "/"}, {"sysio", "root"})
        assert caught.value.message == (
            "unknown demo options: ['alpha', 'zeta']; known: ['root', 'sysio']"
        )

    def test_root(self):
        """root is a path; an empty one is refused."""
        assert parse_root("demo", "/srv/guest") == Path("/srv/guest")
        with pytest.raises(ConfigurationError, match="^demo option root must not be empty$"):
            parse_root("demo", "")

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("1", True), ("TRUE", True), ("yes", True), ("on", True),
         ("0", False), ("False", False), ("no", False), ("off", False), ("", False)],
    )
    def test_flag(self, value, expected):
        """Booleans accept the usual spellings in any case."""
        assert parse_flag("demo", "legacy", value) is expected

    def test_flag_refused(self):
        """Anything else is refused, naming option and value."""
        expected = "^demo option legacy must be 0 or 1, got 'maybe'$"
        with pytest.raises(ConfigurationError, match=expected):
            parse_flag("demo", "legacy", "maybe")

    @pytest.mark.parametrize(("value", "expected"), [("0.5", 0.5), ("300", 300.0), ("1e2", 100.0)])
    def test_seconds(self, value, expected):
        """Durations in (0, maximum] are accepted."""
        assert parse_seconds("demo", "timeout", value, maximum=300.0) == expected

    @pytest.mark.parametrize("value", ["0", "-1", "300.5", "nan", "inf", "soon", ""])
    def test_seconds_refused(self, value):
        """Zero, negatives, over the maximum, NaN, infinity and words are refused."""
        with pytest.raises(ConfigurationError) as caught:
            parse_seconds("demo", "timeout", value, maximum=300.0)
        assert caught.value.message == (
            f"demo option timeout must be seconds in (0, 300], got {value!r}"
        )

    def test_sysio(self):
        """sysio is os or fake."""
        assert [parse_sysio("demo", v) for v in ("os", "fake")] == ["os", "fake"]
        expected = "^demo option sysio must be 'os' or 'fake', got 'fuse'$"
        with pytest.raises(ConfigurationError, match=expected):
            parse_sysio("demo", "fuse")


class _Fake(OsSysIO):
    def __init__(self, root: Path) -> None:
        self.root = root


class TestOpenSysio:
    def _never(self, root: Path) -> SysIO:
        raise AssertionError("the fake kernel must not be opened")

    def test_os(self, monkeypatch, tmp_path):
        """os gives the real syscalls, whatever the environment."""
        monkeypatch.setenv(ALLOW_FAKE_KERNEL_ENV, "1")
        assert type(open_sysio("demo", "os", tmp_path, self._never)) is OsSysIO

    @pytest.mark.parametrize("env", [None, "0", "true", "yes"])
    def test_fake_refused_without_env(self, monkeypatch, tmp_path, env):
        """fake without DSTACK_ALLOW_FAKE_KERNEL=1 is refused before the fake is opened."""
        if env is None:
            monkeypatch.delenv(ALLOW_FAKE_KERNEL_ENV, raising=False)
        else:
            monkeypatch.setenv(ALLOW_FAKE_KERNEL_ENV, env)
        with pytest.raises(ConfigurationError) as caught:
            open_sysio("demo", "fake", tmp_path, self._never)
        assert caught.value.message == (
            "demo option sysio=fake selects the fake kernel of dstack_core.testing, which is for "
            "tests only; refusing it (a test environment sets DSTACK_ALLOW_FAKE_KERNEL=1)"
        )

    def test_fake_with_env(self, monkeypatch, tmp_path, caplog):
        """fake with the env opens the plugin's fake under root and warns in the log."""
        monkeypatch.setenv(ALLOW_FAKE_KERNEL_ENV, "1")
        with caplog.at_level(logging.WARNING):
            io = open_sysio("demo", "fake", tmp_path, _Fake)
        assert isinstance(io, _Fake) and io.root == tmp_path
        assert f"TEST ONLY: platform demo runs on the FAKE kernel under {tmp_path}" in caplog.text

    def test_fake_without_machine(self, monkeypatch, tmp_path):
        """No fake machine under root is a ConfigurationError carrying the reason."""
        monkeypatch.setenv(ALLOW_FAKE_KERNEL_ENV, "1")

        def missing(root: Path) -> SysIO:
            raise FileNotFoundError(f"no fake machine under {root}")

        expected = f"^demo option sysio=fake: no fake machine under {re.escape(str(tmp_path))}$"
        with pytest.raises(ConfigurationError, match=expected):
            open_sysio("demo", "fake", tmp_path, missing)
