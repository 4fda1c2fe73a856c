"""SEV-SNP collateral from AMD's KDS (dstack_sev_snp_stub.kds), against a fake KDS served over
real HTTP on a loopback port: URL shapes, product discovery for version 2 reports, rate
limiting, failures, the cache, and verification of what was fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dstack_sev_snp_stub.amd import MILAN, TURIN, TcbVersion, amd_ark, load_certificate
from dstack_sev_snp_stub.kds import (
    KDS_URL,
    SnpCollateral,
    SnpCollateralCache,
    SnpCollateralSource,
    cert_chain_url,
    crl_url,
    fetch_collateral,
    load_collateral_file,
    vcek_url,
)
from dstack_sev_snp_stub.verify import SnpVerifyOptions, verify_report

from dstack_core.errors import ConfigurationError, EvidenceError
from dstack_core.mockpki_amd import MOCK_PRODUCTS, MockAmdPki, mock_chip_id
from dstack_core.snp import POLICY_RESERVED_ONE, SnpReport, build_report

DATA = Path(__file__).parent / "data"
SEED = bytes(range(32))
PINNED_NOW = 1704067200
TCB = {"Milan": 0x7308000000000003, "Genoa": 0x5417000000000309, "Turin": 0x4800000001030201}


def _mock_report(product: str, *, version: int = 3, chip_id: bytes | None = None) -> bytes:
    pki = MockAmdPki.from_seed(SEED, product=product)
    tcb = TCB[product]
    raw = bytearray(build_report(
        version=version, policy=POLICY_RESERVED_ONE, reported_tcb=tcb, current_tcb=tcb,
        committed_tcb=tcb, launch_tcb=tcb,
        chip_id=mock_chip_id(SEED, product) if chip_id is None else chip_id,
    ))
    if version >= 3:
        raw[0x188:0x18B] = bytes(MOCK_PRODUCTS[product].cpuid)
    return pki.sign_report(bytes(raw))


class FakeKds:
    """AMD's KDS for mock hierarchies (and fixed answers for chosen URLs), counting requests."""

    def __init__(self, products: Mapping[str, MockAmdPki], fixed: Mapping[str, bytes] = ()) -> None:
        self.products = dict(products)
        self.fixed = dict(fixed)
        self.requests: list[str] = []
        self.fail: list[tuple[int, Mapping[str, str]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/vcek/v1/{product}/{what}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        if self.fail:
            status, headers = self.fail.pop(0)
            return web.Response(status=status, headers=dict(headers))
        if request.path_qs in self.fixed:
            return web.Response(body=self.fixed[request.path_qs])
        pki = self.products.get(request.match_info["product"])
        if pki is None:
            return web.Response(status=404)
        what = request.match_info["what"]
        if what == "cert_chain":
            return web.Response(body=pki.ask_pem + pki.ark_pem)
        if what == "crl":
            crl = x509.load_pem_x509_crl(pki.crl_pem())
            return web.Response(body=crl.public_bytes(serialization.Encoding.DER))
        product = pki.product
        try:
            hwid = bytes.fromhex(what)
        except ValueError:
            return web.Response(status=400)
        names = {"fmc": "fmcSPL", "bootloader": "blSPL", "tee": "teeSPL", "snp": "snpSPL",
                 "microcode": "ucodeSPL"}
        wanted = {names[n] for n, byte, _ in product.tcb if byte is not None and n in names}
        if len(hwid) != product.hwid_size or set(request.query) != wanted:
            return web.Response(status=400)
        tcb = 0
        for name, byte, _ in product.tcb:
            if byte is not None and name in names:
                tcb |= int(request.query[names[name]]) << (8 * byte)
        chip_id = hwid.ljust(64, b"\0")
        pem = pki.vcek_pem(chip_id, tcb)
        return web.Response(body=x509.load_pem_x509_certificate(pem).public_bytes(
            serialization.Encoding.DER))


@contextlib.asynccontextmanager
async def serving(kds: FakeKds) -> AsyncIterator[str]:
    runner = web.AppRunner(kds.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _fetch(kds: FakeKds, report: bytes, **kwargs: object) -> SnpCollateral:
    async def go() -> SnpCollateral:
        async with serving(kds) as url:
            return await fetch_collateral(SnpReport.from_bytes(report), base_url=url, **kwargs)

    return asyncio.run(go())


def _passes_with_mock(report: bytes, collateral: SnpCollateral, pki: MockAmdPki, **options: object) -> None:
    result = verify_report(report, collateral, SnpVerifyOptions(
        now=int(time.time()), roots=[load_certificate(pki.ark_pem)], allow_simulator=True,
        **options))  # type: ignore[arg-type]
    assert result.passed, result.reason


class TestUrls:
    def test_milan_vcek_url_is_amds(self):
        """The real Milan report's VCEK URL: product, 64-byte hwid, four SPLs in KDS order."""
        report = SnpReport.from_bytes((DATA / "sev_snp_report_milan.bin").read_bytes())
        url = vcek_url(MILAN, report.chip_id, TcbVersion(raw=report.reported_tcb, product=MILAN))
        assert url == (f"{KDS_URL}/vcek/v1/Milan/{report.chip_id.hex()}"
                       "?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115")

    def test_turin_vcek_url_has_fmc_and_an_8_byte_hwid(self):
        """Turin: hwid is CHIP_ID's first 8 bytes and the query starts with fmcSPL."""
        chip = mock_chip_id(SEED, "Turin")
        url = vcek_url(TURIN, chip, TcbVersion(raw=TCB["Turin"], product=TURIN))
        assert url == (f"{KDS_URL}/vcek/v1/Turin/{chip[:8].hex()}"
                       "?fmcSPL=1&blSPL=2&teeSPL=3&snpSPL=1&ucodeSPL=72")

    def test_chain_and_crl_urls(self):
        """cert_chain and crl live under the product, on any base URL."""
        assert cert_chain_url(MILAN) == f"{KDS_URL}/vcek/v1/Milan/cert_chain"
        assert crl_url(TURIN, base_url="http://kds.test/") == "http://kds.test/vcek/v1/Turin/crl"


class TestFetch:
    @pytest.mark.parametrize("product", list(MOCK_PRODUCTS))
    def test_fetched_collateral_verifies(self, product):
        """A version 3 report: one VCEK and one cert_chain request, under its CPUID's product."""
        pki = MockAmdPki.from_seed(SEED, product=product)
        kds = FakeKds({name: MockAmdPki.from_seed(SEED, product=name) for name in MOCK_PRODUCTS})
        report = _mock_report(product)
        collateral = _fetch(kds, report)
        assert [r.split("/")[3] for r in kds.requests] == [product, product]
        assert kds.requests[1].endswith("/cert_chain")
        _passes_with_mock(report, collateral, pki)

    def test_version_2_report_tries_each_product(self):
        """Without CPUID the products are tried in turn; the KDS's 404s are skipped."""
        kds = FakeKds({"Genoa": MockAmdPki.from_seed(SEED, product="Genoa")})
        report = _mock_report("Genoa", version=2)
        collateral = _fetch(kds, report)
        assert [r.split("/")[3] for r in kds.requests] == ["Milan", "Genoa", "Genoa"]
        _passes_with_mock(report, collateral, MockAmdPki.from_seed(SEED, product="Genoa"))

    def test_turin_shaped_chip_id_asks_turin_first(self):
        """A version 2 report whose CHIP_ID has only 8 bytes set is tried as Turin first."""
        kds = FakeKds({"Turin": MockAmdPki.from_seed(SEED, product="Turin")})
        _fetch(kds, _mock_report("Turin", version=2))
        assert kds.requests[0].startswith("/vcek/v1/Turin/")

    def test_real_report_fetches_amds_certificates(self):
        """The real Milan report asks for exactly the URL AMD serves its VCEK at; it verifies."""
        report = (DATA / "sev_snp_report_milan.bin").read_bytes()
        parsed = SnpReport.from_bytes(report)
        vcek_path = vcek_url(MILAN, parsed.chip_id, TcbVersion(raw=parsed.reported_tcb,
                                                                product=MILAN), base_url="")
        kds = FakeKds({}, fixed={
            vcek_path: (DATA / "sev_snp_vcek_milan.der").read_bytes(),
            "/vcek/v1/Milan/cert_chain": (DATA / "sev_snp_cert_chain_milan.pem").read_bytes(),
        })
        collateral = _fetch(kds, report)
        result = verify_report(report, collateral, SnpVerifyOptions(now=PINNED_NOW))
        assert result.passed, result.reason
        assert collateral.ark is not None and collateral.ark == amd_ark(MILAN)

    def test_rate_limit_is_retried_once(self):
        """A 429 with Retry-After: 0 is retried; a second one fails collateral_unavailable."""
        kds = FakeKds({"Milan": MockAmdPki.from_seed(SEED)})
        kds.fail = [(429, {"Retry-After": "0"})]
        _fetch(kds, _mock_report("Milan"))
        kds.fail = [(429, {"Retry-After": "0"}), (429, {"Retry-After": "0"})]
        with pytest.raises(EvidenceError) as caught:
            _fetch(kds, _mock_report("Milan"))
        assert caught.value.code == "collateral_unavailable"

    def test_server_error_is_collateral_unavailable(self):
        """A 500 from the KDS is EvidenceError(collateral_unavailable) naming the status."""
        kds = FakeKds({"Milan": MockAmdPki.from_seed(SEED)})
        kds.fail = [(500, {})]
        with pytest.raises(EvidenceError, match="answered 500") as caught:
            _fetch(kds, _mock_report("Milan"))
        assert caught.value.code == "collateral_unavailable"

    def test_unreachable_kds_is_collateral_unavailable(self):
        """A closed port is collateral_unavailable, not a crash."""
        async def go() -> None:
            async with serving(FakeKds({})) as url:
                pass
            await fetch_collateral(SnpReport.from_bytes(_mock_report("Milan")), base_url=url)

        with pytest.raises(EvidenceError) as caught:
            asyncio.run(go())
        assert caught.value.code == "collateral_unavailable"

    def test_unknown_chip_everywhere_fails(self):
        """A chip no product's KDS knows fails, listing each product's answer."""
        with pytest.raises(EvidenceError, match="no VCEK for this chip"):
            _fetch(FakeKds({}), _mock_report("Milan", version=2))

    def test_masked_chip_id_cannot_be_fetched(self):
        """A report with CHIP_ID masked (all zero) cannot be looked up; nothing is requested."""
        kds = FakeKds({"Milan": MockAmdPki.from_seed(SEED)})
        with pytest.raises(EvidenceError, match="masked"):
            _fetch(kds, _mock_report("Milan", chip_id=bytes(64)))
        assert kds.requests == []

    def test_crl_is_fetched_when_asked(self):
        """with_crl fetches the product's CRL; verification requiring it passes."""
        pki = MockAmdPki.from_seed(SEED)
        kds = FakeKds({"Milan": pki})
        report = _mock_report("Milan")
        collateral = _fetch(kds, report, with_crl=True)
        assert collateral.crl is not None and kds.requests[-1] == "/vcek/v1/Milan/crl"
        _passes_with_mock(report, collateral, pki, require_crl=True)


class TestSource:
    def test_cache_serves_the_second_lookup(self, tmp_path):
        """The first lookup fetches and caches; a new source on the same cache makes no request."""
        kds = FakeKds({"Milan": MockAmdPki.from_seed(SEED)})
        report = SnpReport.from_bytes(_mock_report("Milan"))
        cache = SnpCollateralCache(directory=tmp_path / "cache")

        async def lookup() -> SnpCollateral | None:
            async with serving(kds) as url:
                source = SnpCollateralSource(cache=cache, kds_url=url)
                return await source.collateral_for(report, now=int(time.time()))

        first = asyncio.run(lookup())
        assert len(kds.requests) == 2
        second = asyncio.run(lookup())
        assert len(kds.requests) == 2
        assert first is not None and second is not None
        assert first.to_json() == second.to_json()
        (entry,) = (tmp_path / "cache").iterdir()
        entry.write_text("{not json")
        asyncio.run(lookup())
        assert len(kds.requests) == 4

    def test_cache_entry_without_current_crl_is_a_miss_when_crls_are_wanted(self, tmp_path):
        """with_crl: an entry without a CRL, or with one not current at ``now``, is refetched."""
        report = SnpReport.from_bytes(_mock_report("Milan"))
        cache = SnpCollateralCache(directory=tmp_path)
        cache.put(report, SnpCollateral.from_bytes(MockAmdPki.from_seed(SEED).collateral_json(
            report.chip_id, report.reported_tcb).encode()))
        assert cache.get(report, now=PINNED_NOW) is not None
        assert cache.get(report, now=PINNED_NOW, with_crl=True) is None

    def test_fixed_collateral_wins_and_no_source_is_none(self, tmp_path):
        """A fixed collateral file is used for every report; with nothing configured: None."""
        report = SnpReport.from_bytes(_mock_report("Milan"))
        fixed = SnpCollateral.from_bytes((DATA / "sev_snp_cert_chain_milan.pem").read_bytes())
        assert asyncio.run(SnpCollateralSource(fixed=fixed).collateral_for(report, now=0)) is fixed
        assert asyncio.run(SnpCollateralSource(cache=SnpCollateralCache(directory=tmp_path))
                           .collateral_for(report, now=0)) is None

    def test_collateral_file(self, tmp_path):
        """load_collateral_file reads any form; unreadable is ConfigurationError, junk EvidenceError."""
        path = tmp_path / "collateral.pem"
        path.write_bytes((DATA / "sev_snp_cert_chain_milan.pem").read_bytes())
        assert load_collateral_file(path).ask is not None
        with pytest.raises(ConfigurationError):
            load_collateral_file(tmp_path / "missing")
        path.write_bytes(b"junk")
        with pytest.raises(EvidenceError):
            load_collateral_file(path)
