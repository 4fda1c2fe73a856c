"""The caller policy: file validation and decisions, as pure functions (policy.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack_core.errors import ConfigurationError
from dstack_core.keys import SIGN_KEY_PATH
from dstack_core.policy import (
    AUDITED,
    KEY_BEARING,
    MEASUREMENT_CHANGING,
    TCP_GUARDED,
    Call,
    Caller,
    Policy,
    load_policy,
    parse_policy,
)
from dstack_core.server.app import API_METHODS

SOURCE = "/etc/dstack/policy.toml"
WEB = Caller(pid=10, uid=1000, gid=1000, cgroup="/system.slice/docker-abc.scope")
DB = Caller(pid=11, uid=1001, gid=1001, cgroup="/system.slice/docker-def.scope")
ROOT = Caller(pid=1, uid=0, gid=0, cgroup="/init.scope")
TCP = Caller(tcp=True, peer="10.0.0.1:5000")

CONFINED = """
default = "allow"
[[rule]]
match = { uid = 1000 }
methods = ["GetKey", "Info", "Sign", "DeriveKey", "DeriveK256Key", "GetTlsKey"]
key_paths = ["app/web/"]
"""


def policy(text: str) -> Policy:
    return parse_policy(text, source=SOURCE, methods=API_METHODS)


def get_key(path: str) -> Call:
    return Call.from_args("GetKey", {"path": path, "purpose": "", "algorithm": ""})


def allowed(p: Policy, caller: Caller, call: Call, *, tcp_guarded: bool = False) -> bool:
    return p.decide(caller, call, tcp_guarded=tcp_guarded).allowed


class TestMethodClasses:
    def test_classes_name_real_methods(self) -> None:
        """Every classified method is one the API serves (a rename cannot drop one silently)."""
        assert KEY_BEARING | MEASUREMENT_CHANGING <= API_METHODS
        assert AUDITED == TCP_GUARDED == KEY_BEARING | MEASUREMENT_CHANGING

    def test_quotes_are_not_key_bearing(self) -> None:
        """Quotes attest, they carry no key: GetQuote, Attest, TdxQuote, RawQuote are not audited."""
        assert not {"GetQuote", "Attest", "TdxQuote", "RawQuote", "Info", "Verify"} & AUDITED


class TestCall:
    @pytest.mark.parametrize("method", ["GetKey", "DeriveK256Key"])
    def test_path_of_get_key(self, method: str) -> None:
        """GetKey and DeriveK256Key use the key at their path."""
        assert Call.from_args(method, {"path": "a/b"}).key_path == "a/b"

    def test_sign_uses_vms(self) -> None:
        """Sign uses GetKey(path="vms")'s key, so its key path is "vms"."""
        assert Call.from_args("Sign", {"algorithm": "ed25519", "data": b""}).key_path == SIGN_KEY_PATH

    def test_certificate_names(self) -> None:
        """GetTlsKey certifies its subject and alt names, and has no key path."""
        call = Call.from_args("GetTlsKey", {"subject": "web", "alt_names": ("a", "b")})
        assert (call.key_path, call.tls_names) == (None, ("web", "a", "b"))
        derive = Call.from_args("DeriveKey", {"path": "p", "subject": "", "alt_names": ("x",)})
        assert (derive.key_path, derive.tls_names) == ("p", ("x",))


class TestDecide:
    def test_first_matching_rule_decides(self) -> None:
        """Rules are tried in order; the first match decides even if a later one would allow."""
        p = policy('default = "allow"\n[[rule]]\nmatch = { uid = 1000 }\nmethods = ["Info"]\n'
                   '[[rule]]\nmatch = { gid = 1000 }\nmethods = ["*"]\n')
        assert not allowed(p, WEB, get_key("x"))
        assert allowed(p, WEB, Call(method="Info"))

    def test_confined_caller(self) -> None:
        """A confined caller derives under its prefix only, and is refused methods it lacks."""
        p = policy(CONFINED)
        assert allowed(p, WEB, get_key("app/web/tls"))
        assert allowed(p, WEB, get_key("app/web/"))
        for path in ("app/db/x", "app/web", "app/webx/y", "", "/app/web/x", "APP/web/x"):
            decision = p.decide(WEB, get_key(path), tcp_guarded=False)
            assert not decision.allowed and decision.rule == 1
            assert repr(path) in decision.reason
        assert not allowed(p, WEB, Call(method="EmitEvent"))
        assert not allowed(p, WEB, Call(method="GetQuote"))

    def test_unmatched_callers_get_the_default(self) -> None:
        """Callers no rule matches are unaffected under default allow, refused under deny."""
        assert allowed(policy(CONFINED), DB, get_key("app/db/x"))
        deny = policy(CONFINED.replace('"allow"', '"deny"'))
        assert not allowed(deny, DB, Call(method="Version"))
        assert allowed(deny, WEB, get_key("app/web/x"))

    def test_absent_default_denies(self) -> None:
        """A policy without ``default`` denies unmatched callers (fail closed)."""
        assert not allowed(policy('[[rule]]\nmatch = { uid = 0 }\nmethods = ["*"]\n'),
                           WEB, Call(method="Version"))

    @pytest.mark.parametrize("method", ["DeriveKey", "DeriveK256Key"])
    def test_tappd_derivations_are_confined(self, method: str) -> None:
        """The Tappd derivations are held to the same prefixes as GetKey."""
        p = policy(CONFINED)
        args = {"path": "app/db/key", "subject": "", "alt_names": ()}
        assert not allowed(p, WEB, Call.from_args(method, args))
        assert allowed(p, WEB, Call.from_args(method, {**args, "path": "app/web/key"}))

    def test_sign_needs_vms_under_key_paths(self) -> None:
        """Sign signs with the vms key: a caller confined elsewhere may not use it."""
        sign = Call.from_args("Sign", {"algorithm": "ed25519", "data": b"x"})
        assert not allowed(policy(CONFINED), WEB, sign)
        assert allowed(policy(CONFINED.replace('"app/web/"', '"app/web/", "vms"')), WEB, sign)

    def test_certificates_for_confined_callers_need_tls_names(self) -> None:
        """GetTlsKey has no path: a confined rule grants it only for names it lists."""
        tls = Call.from_args("GetTlsKey", {"subject": "web.internal", "alt_names": ()})
        assert not allowed(policy(CONFINED), WEB, tls)
        named = policy(CONFINED + 'tls_names = ["web.internal", "*.web.internal"]\n')
        assert allowed(named, WEB, tls)
        assert allowed(named, WEB, Call.from_args(
            "GetTlsKey", {"subject": "a.web.internal", "alt_names": ("web.internal",)}))
        refused = named.decide(WEB, Call.from_args(
            "GetTlsKey", {"subject": "web.internal", "alt_names": ("db.internal",)}),
            tcp_guarded=False)
        assert not refused.allowed and "'db.internal'" in refused.reason

    def test_unconfined_rule_certifies_any_name(self) -> None:
        """A rule without key_paths or tls_names leaves certificate names alone."""
        p = policy('[[rule]]\nmatch = { uid = 1000 }\nmethods = ["GetTlsKey"]\n')
        assert allowed(p, WEB, Call.from_args("GetTlsKey", {"subject": "x", "alt_names": ()}))

    def test_cgroup_glob(self) -> None:
        """cgroup is a glob on the whole path; * also crosses '/'."""
        p = policy('default = "deny"\n[[rule]]\nmatch = { cgroup = "/system.slice/docker-abc*" }\n'
                   'methods = ["*"]\n')
        assert allowed(p, WEB, Call(method="Info"))
        assert allowed(p, Caller(uid=5, gid=5, cgroup="/system.slice/docker-abc.scope/sub"),
                       Call(method="Info"))
        assert not allowed(p, DB, Call(method="Info"))
        assert not allowed(p, Caller(uid=5, gid=5, cgroup="/x/system.slice/docker-abc.scope"),
                           Call(method="Info"))

    def test_unknown_cgroup_is_denied_by_a_cgroup_rule(self) -> None:
        """A caller whose cgroup could not be read cannot be judged by a cgroup rule: denied."""
        p = policy('default = "allow"\n[[rule]]\nmatch = { cgroup = "/web/*" }\n'
                   'methods = ["Info"]\n')
        unknown = Caller(pid=0, uid=1000, gid=1000, cgroup=None)
        decision = p.decide(unknown, get_key("x"), tcp_guarded=False)
        assert not decision.allowed and "identity" in decision.reason

    def test_rule_before_cgroup_rule_still_decides(self) -> None:
        """An unknown cgroup only matters once a cgroup rule is reached."""
        p = policy('[[rule]]\nmatch = { uid = 1000 }\nmethods = ["*"]\n'
                   '[[rule]]\nmatch = { cgroup = "/web/*" }\nmethods = ["Info"]\n')
        assert allowed(p, Caller(pid=0, uid=1000, gid=1000), get_key("x"))

    def test_all_criteria_must_fit(self) -> None:
        """uid and gid in one match must both fit; lists of ids match any member."""
        p = policy('default = "deny"\n[[rule]]\nmatch = { uid = [1000, 1001], gid = 1000 }\n'
                   'methods = ["*"]\n')
        assert allowed(p, WEB, Call(method="Info"))
        assert not allowed(p, DB, Call(method="Info"))

    def test_unix_rules_never_match_tcp(self) -> None:
        """uid, gid and cgroup rules never match the TCP caller; tcp = false matches Unix only."""
        p = policy('default = "deny"\n[[rule]]\nmatch = { uid = 0 }\nmethods = ["*"]\n'
                   '[[rule]]\nmatch = { tcp = false }\nmethods = ["Version"]\n')
        assert not allowed(p, TCP, Call(method="Version"))
        assert allowed(p, DB, Call(method="Version"))


class TestTcp:
    def test_hardware_tcp_gets_no_key_without_a_grant(self) -> None:
        """On a non-simulated platform TCP gets no key-bearing or measuring method by default."""
        for p in (Policy(), policy('default = "allow"\n')):
            for method in sorted(TCP_GUARDED):
                decision = p.decide(TCP, Call(method=method), tcp_guarded=True)
                assert not decision.allowed and "TCP" in decision.reason
            assert allowed(p, TCP, Call(method="Info"), tcp_guarded=True)
            assert allowed(p, TCP, Call(method="GetQuote"), tcp_guarded=True)
            assert allowed(p, TCP, get_key("x"), tcp_guarded=False)
            assert allowed(p, ROOT, get_key("x"), tcp_guarded=True)

    def test_explicit_tcp_rule_grants(self) -> None:
        """A tcp = true rule grants TCP what it lists, within its key paths."""
        p = policy('[[rule]]\nmatch = { tcp = true }\nmethods = ["GetKey", "Version"]\n'
                   'key_paths = ["public/"]\n')
        assert allowed(p, TCP, get_key("public/x"), tcp_guarded=True)
        assert not allowed(p, TCP, get_key("private/x"), tcp_guarded=True)
        assert not allowed(p, TCP, Call(method="EmitEvent"), tcp_guarded=True)
        assert p.grants_tcp() == {"GetKey"}
        assert policy('[[rule]]\nmatch = { tcp = true }\nmethods = ["*"]\n').grants_tcp() == TCP_GUARDED


class TestValidation:
    @pytest.mark.parametrize(
        ("text", "where", "what"),
        [
            ('default = "maybe"\n', "default", "allow"),
            ('defualt = "allow"\n', "defualt", "unknown key"),
            ('[rule]\nmatch = { uid = 1 }\nmethods = ["*"]\n', "rule", "[[rule]]"),
            ('[[rule]]\nmethods = ["*"]\n', "rule 1: match", "missing"),
            ('[[rule]]\nmatch = { uid = 1 }\n', "rule 1: methods", "missing"),
            ('[[rule]]\nmatch = { uid = 1 }\nmethods = ["GetKeys"]\n', "rule 1: methods",
             "'GetKeys'"),
            ('[[rule]]\nmatch = { uid = 1 }\nmethods = ["Tappd.DeriveKey"]\n',
             "rule 1: methods", "'DeriveKey'"),
            ('[[rule]]\nmatch = { uid = 1 }\nmethods = "GetKey"\n', "rule 1: methods",
             "list of strings"),
            (('[[rule]]\nmatch = { uid = 1 }\nmethods = ["*"]\n[[rule]]\nmatch = { uid = "x" }\n'
              'methods = ["*"]\n'), "rule 2: match.uid", "id"),
            ('[[rule]]\nmatch = { gid = -1 }\nmethods = ["*"]\n', "rule 1: match.gid", "id"),
            ('[[rule]]\nmatch = { uid = true }\nmethods = ["*"]\n', "rule 1: match.uid", "id"),
            ('[[rule]]\nmatch = { uid = [] }\nmethods = ["*"]\n', "rule 1: match.uid", "id"),
            ('[[rule]]\nmatch = { user = 1 }\nmethods = ["*"]\n', "rule 1: match.user",
             "unknown key"),
            ('[[rule]]\nmatch = {}\nmethods = ["*"]\n', "rule 1: match", "at least one"),
            ('[[rule]]\nmatch = { cgroup = "docker-*" }\nmethods = ["*"]\n',
             "rule 1: match.cgroup", "glob"),
            ('[[rule]]\nmatch = { tcp = "yes" }\nmethods = ["*"]\n', "rule 1: match.tcp",
             "true or false"),
            ('[[rule]]\nmatch = { tcp = true, uid = 0 }\nmethods = ["*"]\n',
             "rule 1: match.tcp", "cannot be combined"),
            ('[[rule]]\nmatch = { uid = 1 }\nmethods = ["*"]\nkey_paths = "app/"\n',
             "rule 1: key_paths", "list of strings"),
            ('[[rule]]\nmatch = { uid = 1 }\nmethods = ["*"]\ntls_names = [""]\n',
             "rule 1: tls_names", "empty"),
            ('[[rule]]\nmatch = { uid = 1 }\nmethods = ["*"]\nkeypaths = []\n',
             "rule 1: keypaths", "unknown key"),
            ("[[rule]\n", "", "not valid TOML"),
        ],
    )
    def test_errors_name_file_rule_and_key(self, text: str, where: str, what: str) -> None:
        """Each invalid policy is refused naming the file, the rule and the key."""
        with pytest.raises(ConfigurationError) as caught:
            policy(text)
        message = caught.value.message
        assert message.startswith(f"policy file {SOURCE}: {where}"), message
        assert what in message

    def test_load_records_digest_and_source(self, tmp_path: Path) -> None:
        """load_policy keeps the file's SHA-256, not its contents, for the audit log."""
        import hashlib

        path = tmp_path / "p.toml"
        path.write_text(CONFINED)
        loaded = load_policy(path, methods=API_METHODS)
        assert loaded.digest == hashlib.sha256(CONFINED.encode()).hexdigest()
        assert loaded.source == path and len(loaded.rules) == 1

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A missing or non-UTF-8 file is a start-up error naming it."""
        with pytest.raises(ConfigurationError, match="cannot read policy file .*missing"):
            load_policy(tmp_path / "missing", methods=API_METHODS)
        (tmp_path / "bin").write_bytes(b"\xff\xfe")
        with pytest.raises(ConfigurationError, match="cannot read policy file"):
            load_policy(tmp_path / "bin", methods=API_METHODS)

    def test_prefix_without_slash_warns(self, caplog: pytest.LogCaptureFixture) -> None:
        """A key path prefix without a trailing '/' is accepted with a warning naming the rule."""
        policy('[[rule]]\nmatch = { uid = 1 }\nmethods = ["*"]\nkey_paths = ["app/web"]\n')
        assert "rule 1" in caplog.text and "'app/web'" in caplog.text

    def test_empty_lists_are_explicit(self) -> None:
        """key_paths = [] grants no path; an empty methods list grants nothing."""
        p = policy('default = "allow"\n[[rule]]\nmatch = { uid = 1000 }\nmethods = ["GetKey"]\n'
                   'key_paths = []\n[[rule]]\nmatch = { uid = 1001 }\nmethods = []\n')
        assert not allowed(p, WEB, get_key("x"))
        assert not allowed(p, DB, Call(method="Version"))
