"""Plans (core/plans.py): every rule between parsing a request and acting on it, each with a pass and a fail case.

Rules: admission, channel (downloads, update checks, /channel_self), size cap, ticket checks, origin confinement,
location confinement, Range form and bounds, the session key of an encrypted download, the size the origin
declares, the Host a ticket url names, an offer held back by a staged rollout or a halt (and its fallback), and what an
update server's answer is to the gateway.
No sockets: plain values in, a plan or a Refusal out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core import capgo_crypto
from gateway.core.capgo import DeviceInfo, Kind, parse_info
from gateway.core.identity import ClientIdentity
from gateway.core.plans import (
    WHOLE_BODY_BYTES,
    DownloadPlan,
    Fallback,
    HeldBack,
    OfferPlan,
    ResponsePlan,
    ServerEndpoint,
    Unsatisfiable,
    UpdatePlan,
    channel_self_problem,
    current_channel,
    plan_fallback,
    plan_offer,
    plan_release,
    plan_response,
    plan_staged,
    plan_ticket_download,
    plan_update,
    range_start,
    read_whole,
    redeem_ticket,
    server_answer,
    settle_size,
    size_cap,
    ticket_base_url,
)
from gateway.core.policy import AppPolicy, Channels, ClientRule, Peer, PolicySet, Verification, Versions
from gateway.core.rates import MinRate
from gateway.core.reasons import Reason, Refusal
from gateway.core.releases import Release, ReleaseIndex
from gateway.core.review import Decline, ManifestEntry, Offer, Served
from gateway.core.rollout import HALTED, NOT_IN_ROLLOUT, Halt, Rollout
from gateway.core.tickets import Ticket, TicketKey, open_ticket, seal
from gateway.core.verify import Expectation
from tests.support import CAPGO_FIXTURES, capgo_fixture, device_body

APP_ID = "com.example.app"
NOW = 1_800_000_000.0
GLOBAL_CAP = 1000
KEY = TicketKey("k1", b"s" * 32)
PUB = (CAPGO_FIXTURES / "key.pub").read_text()
FX = capgo_fixture("1.1.0")
SHA = "cd" * 32


def identity(cn: str) -> ClientIdentity:
    return ClientIdentity(
        sha256=hashlib.sha256(cn.encode()).hexdigest(),
        spki_sha256="",
        subject=f"CN={cn}",
        common_name=cn,
        organizations=(),
        organizational_units=(),
        issuer="CN=test CA",
        serial="1",
        not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        san_dns=(),
        san_uri=(),
        san_email=(),
        san_ip=(),
        client_auth_eku=True,
    )


DEVICE = Peer(identity("device-1"))
STRANGER = Peer(identity("stranger"))
APP = AppPolicy(
    APP_ID,
    "cdn",
    Channels("production", ("production", "beta"), self_set=True),
    "test.yaml",
    clients=(ClientRule("fleet", cn=("device-*",)),),
)
SIGNED = dataclasses.replace(APP, verification=Verification(public_keys=(PUB,)))
HOSTS = {"cdn": frozenset({"cdn.example"}), "local": None}
INDEX = ReleaseIndex(
    APP_ID,
    (
        Release("1.0.0", "production", "1.0.0.zip", 100, SHA),
        Release("1.1.0", "internal", "1.1.0.zip", 100, SHA),
        Release("2.0.0", "production", "2.0.0.zip", GLOBAL_CAP + 1, SHA),
    ),
)


def policies(app: AppPolicy = APP) -> PolicySet:
    return PolicySet({app.app_id: app})


def refused(result: object, reason: Reason, match: str = "") -> Refusal:
    assert isinstance(result, Refusal), result
    assert result.reason is reason, result
    assert match in result.detail, result.detail
    return result


TICKET = Ticket(
    app_id=APP_ID,
    version="1.1.0",
    sha256=SHA,
    origin="cdn",
    location="https://cdn.example/com.example.app/1.1.0.zip",
    identity=DEVICE.identity.sha256,
    expires=int(NOW) + 60,
    size=100,
)


def ticket_plan(
    ticket: Ticket = TICKET, app: AppPolicy = APP, peer: Peer = DEVICE, range_header: str | None = None, **kw: Any
) -> DownloadPlan | Refusal:
    return plan_ticket_download(
        ticket,
        policies(app),
        peer,
        origin_hosts=kw.get("origin_hosts", HOSTS),
        max_bundle_bytes=kw.get("max_bundle_bytes", GLOBAL_CAP),
        range_header=range_header,
    )


# --- size cap ----------------------------------------------------------------------------------------------------


def test_size_cap_is_the_lower_of_the_gateway_and_the_app_limit() -> None:
    assert size_cap(APP, 1000) == 1000
    small = dataclasses.replace(APP, verification=Verification(max_bundle_bytes=10))
    assert size_cap(small, 1000) == 10
    big = dataclasses.replace(APP, verification=Verification(max_bundle_bytes=10_000))
    assert size_cap(big, 1000) == 1000  # an app cannot raise the gateway's limit


# --- release downloads -------------------------------------------------------------------------------------------


def test_release_on_an_allowed_channel_is_planned() -> None:
    plan = plan_release(APP, INDEX, "1.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP)
    assert isinstance(plan, DownloadPlan)
    assert (plan.origin, plan.location, plan.expect.sha256, plan.expect.size) == ("cdn", "1.0.0.zip", SHA, 100)
    assert plan.range_from is None and plan.aes is None


def test_unknown_release_is_refused() -> None:
    refused(plan_release(APP, INDEX, "9.9.9", origin="cdn", max_bundle_bytes=GLOBAL_CAP), Reason.RELEASE_UNKNOWN)


def test_release_on_a_channel_the_policy_does_not_allow_is_refused() -> None:
    refused(plan_release(APP, INDEX, "1.1.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP), Reason.RELEASE_UNKNOWN)
    internal = dataclasses.replace(APP, channels=Channels("production", ("production", "internal")))
    assert isinstance(plan_release(internal, INDEX, "1.1.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP), DownloadPlan)


def test_release_above_the_size_cap_is_refused() -> None:
    refused(plan_release(APP, INDEX, "2.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP), Reason.SIZE_EXCEEDED)
    assert isinstance(plan_release(APP, INDEX, "2.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP + 1), DownloadPlan)
    small = dataclasses.replace(APP, verification=Verification(max_bundle_bytes=99))
    refused(plan_release(small, INDEX, "1.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP), Reason.SIZE_EXCEEDED)


# --- tickets -----------------------------------------------------------------------------------------------------


def test_a_valid_ticket_is_redeemed_by_its_holder_only() -> None:
    token = seal(TICKET, KEY)
    assert redeem_ticket(token, [KEY], now=NOW, peer=DEVICE) == TICKET
    refused(redeem_ticket(token, [KEY], now=NOW, peer=STRANGER), Reason.TICKET_INVALID, "another client")
    refused(redeem_ticket(token, [KEY], now=TICKET.expires, peer=DEVICE), Reason.TICKET_INVALID, "expired")
    refused(redeem_ticket(token[:-2] + "AA", [KEY], now=NOW, peer=DEVICE), Reason.TICKET_INVALID, "signature")


def test_ticket_download_is_planned_from_the_ticket() -> None:
    plan = ticket_plan()
    assert isinstance(plan, DownloadPlan)
    assert (plan.app_id, plan.version, plan.origin, plan.location) == (APP_ID, "1.1.0", "cdn", TICKET.location)
    assert (plan.expect.sha256, plan.expect.size, plan.expect.max_bytes) == (SHA, 100, GLOBAL_CAP)
    assert plan.content_type == "application/zip" and not plan.brotli


def test_ticket_download_readmits_the_client() -> None:
    assert isinstance(ticket_plan(peer=DEVICE), DownloadPlan)
    refused(ticket_plan(peer=STRANGER), Reason.IDENTITY_NOT_ALLOWED)


def test_ticket_origin_must_still_serve_the_app() -> None:
    refused(ticket_plan(dataclasses.replace(TICKET, origin="local")), Reason.TICKET_INVALID, "no longer serves")
    refused(ticket_plan(dataclasses.replace(TICKET, origin="gone")), Reason.TICKET_INVALID, "no longer serves")
    moved = dataclasses.replace(APP, origin="local")
    local = dataclasses.replace(TICKET, origin="local", location="1.1.0.zip")
    assert isinstance(ticket_plan(local, moved), DownloadPlan)


@pytest.mark.parametrize(
    "location",
    [
        "http://cdn.example/com.example.app/1.1.0.zip",
        "https://evil.example/com.example.app/1.1.0.zip",
        "https://user:pw@cdn.example/com.example.app/1.1.0.zip",
    ],
)
def test_https_ticket_location_is_confined_to_the_origin_hosts(location: str) -> None:
    refused(ticket_plan(dataclasses.replace(TICKET, location=location)), Reason.TICKET_INVALID, "location")


@pytest.mark.parametrize("location", ["../other.app/1.0.0.zip", "/etc/passwd", "a/../../b.zip", "a\\b.zip", ""])
def test_directory_ticket_location_is_confined_to_the_app_folder(location: str) -> None:
    moved = dataclasses.replace(APP, origin="local")
    ticket = dataclasses.replace(TICKET, origin="local", location=location)
    refused(ticket_plan(ticket, moved), Reason.TICKET_INVALID, "location")
    assert isinstance(ticket_plan(dataclasses.replace(ticket, location="assets/1.1.0.zip"), moved), DownloadPlan)


def test_ticket_above_the_size_cap_is_refused() -> None:
    refused(ticket_plan(max_bundle_bytes=99), Reason.SIZE_EXCEEDED, "above the limit of 99")
    assert isinstance(ticket_plan(max_bundle_bytes=100), DownloadPlan)
    small = dataclasses.replace(APP, verification=Verification(max_bundle_bytes=50))
    refused(ticket_plan(app=small), Reason.SIZE_EXCEEDED, "above the limit of 50")


def test_ticket_without_a_size_is_capped_while_it_streams() -> None:
    plan = ticket_plan(dataclasses.replace(TICKET, size=None))
    assert isinstance(plan, DownloadPlan)
    assert (plan.expect.size, plan.expect.limit) == (None, GLOBAL_CAP)


def test_encrypted_ticket_opens_with_the_app_key_only() -> None:
    ticket = dataclasses.replace(
        TICKET, sha256=FX["checksum"], checksum=FX["encrypted_checksum"], session_key=FX["iv_session_key"]
    )
    plan = ticket_plan(ticket, SIGNED)
    assert isinstance(plan, DownloadPlan) and plan.aes is not None
    assert "aes" not in repr(plan)  # the bundle key never reaches a log line
    refused(ticket_plan(ticket, APP), Reason.SIGNATURE_INVALID)  # the app lists no key that opens it
    forged = dataclasses.replace(ticket, checksum=capgo_crypto.sign_checksum(_other_key(), FX["checksum"]))
    refused(ticket_plan(forged, SIGNED), Reason.SIGNATURE_INVALID)


def _other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_manifest_files_are_octet_streams_and_br_files_are_decompressed() -> None:
    plan = ticket_plan(dataclasses.replace(TICKET, file_name="assets/index.js.br"))
    assert isinstance(plan, DownloadPlan)
    assert (plan.content_type, plan.brotli) == ("application/octet-stream", True)
    plain = ticket_plan(dataclasses.replace(TICKET, file_name="assets/index.js"))
    assert isinstance(plain, DownloadPlan) and not plain.brotli


# --- Range -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "start"), [(None, None), ("bytes=0-", 0), ("bytes=42-", 42), (" bytes=7- ", 7)])
def test_open_ended_range_is_served(header: str | None, start: int | None) -> None:
    assert range_start(header) == start
    plan = ticket_plan(range_header=header)
    assert isinstance(plan, DownloadPlan) and plan.range_from == start


@pytest.mark.parametrize(
    "header", ["bytes=0-10", "bytes=-10", "bytes=1-,5-", "items=0-", "bytes=a-", "bytes=" + "9" * 16 + "-"]
)
def test_other_range_forms_are_refused(header: str) -> None:
    refused(range_start(header), Reason.RANGE_NOT_SATISFIABLE)
    refused(ticket_plan(range_header=header), Reason.RANGE_NOT_SATISFIABLE)
    release = plan_release(APP, INDEX, "1.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP, range_header=header)
    refused(release, Reason.RANGE_NOT_SATISFIABLE)


@pytest.mark.parametrize(("header", "start"), [(None, None), ("bytes=0-", 0), ("bytes=42-", 42)])
def test_a_download_by_version_takes_the_same_range_as_a_ticket(header: str | None, start: int | None) -> None:
    plan = plan_release(APP, INDEX, "1.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP, range_header=header)
    assert isinstance(plan, DownloadPlan) and plan.range_from == start
    answer = plan_response(plan, plan.expect.size)
    assert isinstance(answer, ResponsePlan) and answer.send_from == (start or 0)
    # the release is looked up first: an unknown one is 404 whatever the range
    unknown = plan_release(APP, INDEX, "9.9.9", origin="cdn", max_bundle_bytes=GLOBAL_CAP, range_header="bytes=a-")
    refused(unknown, Reason.RELEASE_UNKNOWN)


# --- the response, once the origin declared its size -------------------------------------------------------------


def planned(**kw: Any) -> DownloadPlan:
    plan = ticket_plan(**kw)
    assert isinstance(plan, DownloadPlan)
    return plan


def test_whole_file_response() -> None:
    assert plan_response(planned(), 100) == ResponsePlan(200, planned().expect, 0, 100, None)
    unknown = planned(ticket=dataclasses.replace(TICKET, size=None))
    assert plan_response(unknown, None) == ResponsePlan(200, unknown.expect, 0, None, None)  # chunked


def test_a_declared_size_is_the_exact_size_when_nothing_else_gave_one() -> None:
    expect = Expectation("ab" * 32, None, max_bytes=1000)
    assert settle_size(expect, 400) == Expectation("ab" * 32, 400, 1000)  # bytes past it or short of it fail
    assert settle_size(expect, None) is expect
    refused(settle_size(expect, 1001), Reason.SIZE_EXCEEDED, "above the limit of 1000")
    unknown = planned(ticket=dataclasses.replace(TICKET, size=None))
    answer = plan_response(unknown, 100)
    assert isinstance(answer, ResponsePlan) and answer.expect.size == 100 and answer.content_length == 100


def test_declared_size_must_match_the_expected_one() -> None:
    refused(plan_response(planned(), 101), Reason.SIZE_EXCEEDED, "declares 101")
    refused(plan_response(planned(), 99), Reason.SHORT_BODY, "declares 99")
    assert isinstance(plan_response(planned(), None), ResponsePlan)  # an origin may not declare it


def test_range_response() -> None:
    answer = plan_response(planned(range_header="bytes=40-"), 100)
    assert isinstance(answer, ResponsePlan)
    assert (answer.status, answer.send_from, answer.content_length, answer.content_range) == (
        206,
        40,
        60,
        "bytes 40-99/100",
    )
    # the size comes from the origin when the ticket has none; the verifier then expects exactly that many
    unsized = plan_response(planned(ticket=dataclasses.replace(TICKET, size=None), range_header="bytes=40-"), 100)
    assert isinstance(unsized, ResponsePlan) and unsized.expect.size == 100


def test_range_past_the_end_or_of_an_unknown_size_is_unsatisfiable() -> None:
    past = plan_response(planned(range_header="bytes=100-"), 100)
    assert isinstance(past, Unsatisfiable) and past.size == 100
    assert isinstance(plan_response(planned(range_header="bytes=99-"), 100), ResponsePlan)
    unknown = plan_response(planned(ticket=dataclasses.replace(TICKET, size=None), range_header="bytes=0-"), None)
    assert isinstance(unknown, Unsatisfiable) and unknown.size is None


def shape(size: int | None, *, start: int | None = None) -> ResponsePlan:
    expect = Expectation("ab" * 32, size, max_bytes=10**9)
    if size is None:
        return ResponsePlan(200, expect, 0, None)
    if start is None:
        return ResponsePlan(200, expect, 0, size)
    return ResponsePlan(206, expect, start, size - start, f"bytes {start}-{size - 1}/{size}")


DEFAULT_RATE = MinRate(4096, 60.0)  # limits.origin_min_rate, limits.rate_window


def test_a_small_body_is_read_whole_within_one_rate_window() -> None:
    assert read_whole(shape(1024), DEFAULT_RATE) == 60.0
    assert read_whole(shape(WHOLE_BODY_BYTES), DEFAULT_RATE) == 60.0
    assert read_whole(shape(1024, start=100), DEFAULT_RATE) == 60.0  # a range of a small body too
    assert read_whole(shape(1024), MinRate(0, 60.0)) == math.inf  # the rule is off: no deadline of its own


def test_a_large_or_unsized_body_is_streamed() -> None:
    assert read_whole(shape(WHOLE_BODY_BYTES + 1), DEFAULT_RATE) is None
    assert read_whole(shape(None), DEFAULT_RATE) is None  # chunked: the size is known to nobody
    unsized_answer = ResponsePlan(200, Expectation("ab" * 32, 1024), 0, None)
    assert read_whole(unsized_answer, DEFAULT_RATE) is None


def test_a_small_body_that_a_lowered_rate_could_stream_longer_is_streamed() -> None:
    """One deadline is the minimum-rate rule only for a body below one window's worth of the rate: a stream of a
    larger one may be waited on for longer, so it keeps the stream and its meter."""
    slow = MinRate(10, 60.0)  # 600 bytes per window
    assert read_whole(shape(599), slow) == 60.0
    assert read_whole(shape(600), slow) is None
    assert read_whole(shape(1024), slow) is None


# --- update checks -----------------------------------------------------------------------------------------------


def device(channel: str | None = None) -> DeviceInfo:
    extra = {} if channel is None else {"defaultChannel": channel}
    return parse_info(device_body(APP_ID, **extra))


def test_update_check_is_planned_on_the_default_or_the_device_channel() -> None:
    assert plan_update(policies(), DEVICE, device()) == UpdatePlan(APP, "production", "cdn")
    assert plan_update(policies(), DEVICE, device("beta")) == UpdatePlan(APP, "beta", "cdn")


def test_update_check_of_a_client_not_admitted_is_refused() -> None:
    refused(plan_update(policies(), STRANGER, device()), Reason.IDENTITY_NOT_ALLOWED)
    refused(plan_update(PolicySet({}), DEVICE, device()), Reason.APP_UNKNOWN)


def test_update_check_on_a_channel_the_policy_does_not_allow_is_blocked() -> None:
    plan = plan_update(policies(), DEVICE, device("internal"))
    assert isinstance(plan, UpdatePlan) and plan.decline is not None
    assert (plan.decline.error, plan.decline.kind) == ("channel_not_allowed", Kind.BLOCKED)
    assert plan.decline.reason is Reason.CHANNEL_NOT_ALLOWED


# --- /channel_self -----------------------------------------------------------------------------------------------


def test_self_set_channel_must_be_allowed() -> None:
    assert channel_self_problem(APP, "POST", "beta") is None
    refused(channel_self_problem(APP, "POST", "internal"), Reason.CHANNEL_NOT_ALLOWED, "not allowed")
    refused(channel_self_problem(APP, "POST", None), Reason.BAD_REQUEST)
    refused(channel_self_problem(APP, "POST", "../x"), Reason.BAD_REQUEST)


def test_self_set_needs_the_policy_to_allow_it() -> None:
    locked = dataclasses.replace(APP, channels=Channels("production", ("production", "beta")))
    for method in ("POST", "DELETE"):
        refused(channel_self_problem(locked, method, "beta"), Reason.CHANNEL_NOT_ALLOWED, "own channel")
    assert channel_self_problem(APP, "DELETE", None) is None
    assert channel_self_problem(locked, "GET", None) is None and channel_self_problem(locked, "PUT", None) is None


def test_current_channel_is_the_device_one_only_when_allowed() -> None:
    assert current_channel(APP, "beta") == "beta"
    assert current_channel(APP, "internal") == "production"
    assert current_channel(APP, None) == "production"


# --- offers: ticket urls -----------------------------------------------------------------------------------------

OFFER = Offer(
    version="1.1.0",
    location="https://cdn.example/com.example.app/1.1.0.zip",
    checksum=SHA,
    session_key="",
    digest=SHA,
    decrypt=False,
    lowers_channel=False,
    manifest=(
        ManifestEntry("assets/index.js.br", "ef" * 32, "https://cdn.example/files/index.js.br", "ef" * 32),
        ManifestEntry("assets/raw.txt", "ab", "https://cdn.example/files/raw.txt", None),
    ),
)


def offer_plan(offer: Offer = OFFER, **kw: Any) -> OfferPlan | Refusal:
    args: dict[str, Any] = {"key": KEY, "now": NOW, "ttl": 60, "public_url": None, "host_header": "gw.example:8443"}
    served = kw.pop("served", Served(SHA, 100))
    return plan_offer(offer, served, app_id=APP_ID, origin="cdn", peer=DEVICE, **{**args, **kw})


def test_offer_urls_become_tickets_bound_to_the_device() -> None:
    plan = offer_plan()
    assert isinstance(plan, OfferPlan) and plan.tickets == 2
    url = plan.body["url"]
    assert url.startswith("https://gw.example:8443/bundles/t/") and url.endswith("/1.1.0.zip")
    ticket = open_ticket(url.split("/")[-2], [KEY], now=NOW, identity=DEVICE.identity.sha256)
    assert (ticket.location, ticket.size, ticket.origin, ticket.expires) == (OFFER.location, 100, "cdn", NOW + 60)
    entries = plan.body["manifest"]
    assert entries[0]["download_url"].endswith("/index.js.br")
    assert entries[1]["download_url"] == "https://cdn.example/files/raw.txt"  # unverified: the origin's url


def test_unverified_offer_keeps_the_origin_url_and_needs_no_host() -> None:
    plan = offer_plan(dataclasses.replace(OFFER, digest=None, manifest=()), host_header="not a host")
    assert isinstance(plan, OfferPlan) and plan.tickets == 0 and plan.body["url"] == OFFER.location


@pytest.mark.parametrize("host", ["gw.example", "gw.example:8443", "[::1]:8443", "127.0.0.1"])
def test_ticket_urls_name_the_request_host_when_it_is_a_host(host: str) -> None:
    assert ticket_base_url(None, host) == f"https://{host}"


@pytest.mark.parametrize("host", [None, "", "gw.example/evil", "gw.example@evil", "a b", "gw.example:8443:1"])
def test_a_host_header_that_is_not_a_host_is_refused(host: str | None) -> None:
    refused(ticket_base_url(None, host), Reason.BAD_REQUEST, "Host")
    refused(offer_plan(host_header=host), Reason.BAD_REQUEST, "Host")


def test_public_url_wins_over_the_host_header() -> None:
    assert ticket_base_url("https://ota.example", "evil.example") == "https://ota.example"
    plan = offer_plan(public_url="https://ota.example", host_header="not a host")
    assert isinstance(plan, OfferPlan) and plan.body["url"].startswith("https://ota.example/bundles/t/")


# --- staged rollouts and halts: held back, and the fallback ------------------------------------------------------

STAGED_INDEX = ReleaseIndex(
    APP_ID,
    (
        Release("1.1.0", "production", "1.1.0.zip", 100, SHA),
        Release("1.2.0", "production", "1.2.0.zip", 100, SHA),
        Release("1.2.5", "beta", "1.2.5.zip", 100, SHA),
        Release("1.3.0", "production", "1.3.0.zip", 100, SHA),
    ),
)
NEW = dataclasses.replace(OFFER, version="1.3.0", manifest=())
DEVICE_IDS = ("00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002")


def staged(
    app: AppPolicy = APP, halts: dict[str, str] | None = None, device_id: str = DEVICE_IDS[0]
) -> HeldBack | None:
    """The held-back plan (asserted held back; `passes` checks the other way)."""
    held = plan_staged(app, NEW, cert_sha256=DEVICE.identity.sha256, device_id=device_id, halts=halts or {})
    assert held is not None, "not held back"
    return held


def passes(app: AppPolicy = APP, halts: dict[str, str] | None = None) -> bool:
    return plan_staged(app, NEW, cert_sha256=DEVICE.identity.sha256, device_id=DEVICE_IDS[0], halts=halts or {}) is None


def rolled_out(percent: dict[str, float], app: AppPolicy = APP, **kw: Any) -> AppPolicy:
    identity = kw.pop("identity", "certificate")
    return dataclasses.replace(app, rollout=Rollout(percent, identity=identity, halt=Halt(**kw)))


def fallback(
    held: HeldBack,
    app: AppPolicy,
    *,
    index: ReleaseIndex | None = STAGED_INDEX,
    channel: str = "production",
    version: str = "1.0.0",
    host: str = "cdn.example",
) -> Fallback:
    dev = parse_info(device_body(APP_ID, version=version))
    locate = lambda file: f"https://{host}/{APP_ID}/{file}"  # noqa: E731
    return plan_fallback(held, app, dev, channel, index, locate=locate, hosts=frozenset({"cdn.example"}))


def up_to_date(result: Fallback, why: str = "") -> None:
    assert isinstance(result.outcome, Decline), result
    assert (result.outcome.kind, result.outcome.reason, result.served) == (Kind.UP_TO_DATE, None, None)
    assert why in result.outcome.message and result.why == result.outcome.message


def offered(result: Fallback, version: str) -> None:
    assert isinstance(result.outcome, Offer), result
    assert result.outcome.version == version and result.served == Served(SHA, 100)
    assert result.outcome.location == f"https://cdn.example/{APP_ID}/{version}.zip"


def test_a_halted_offer_is_held_back_even_for_an_app_without_a_rollout() -> None:
    held = staged(APP, {"1.3.0": "halted by operator"})
    assert (held.cause, held.why) == (HALTED, "1.3.0 is halted")
    assert passes(APP)
    assert passes(APP, {"1.2.0": "another version"})


def test_an_offer_is_held_back_from_a_device_outside_its_rollout() -> None:
    held = staged(rolled_out({"1.3.0": 0}))
    assert held.cause == NOT_IN_ROLLOUT and "staged rollout" in held.why
    assert passes(rolled_out({"1.3.0": 100}))
    assert passes(rolled_out({"1.2.0": 0}))  # a version the rollout does not list is at 100 %


def test_who_the_device_is_follows_the_rollout_identity() -> None:
    by_cert = [staged(rolled_out({"1.3.0": 0}), device_id=d) for d in DEVICE_IDS]
    by_device = [staged(rolled_out({"1.3.0": 0}, identity="device"), device_id=d) for d in DEVICE_IDS]
    assert by_cert[0].device == by_cert[1].device == DEVICE.identity.sha256  # one certificate, one device
    assert len({by_device[0].device, by_device[1].device, DEVICE.identity.sha256}) == 3


def test_a_held_back_device_gets_the_newest_release_before_the_offer() -> None:
    app = rolled_out({"1.3.0": 0})
    result = fallback(staged(app), app)
    offered(result, "1.2.0")
    assert result.why == "1.3.0 is in a staged rollout not open to this device yet"


def test_without_offer_previous_or_an_index_the_device_is_up_to_date() -> None:
    app = rolled_out({"1.3.0": 0}, offer_previous=False)
    held = staged(app)
    assert held.look_back is False
    up_to_date(fallback(held, app), "staged rollout")
    app = rolled_out({"1.3.0": 0})
    assert staged(app).look_back is True
    up_to_date(fallback(staged(app), app, index=None), "staged rollout")


def test_the_fallback_is_older_than_the_offer_and_newer_than_the_device() -> None:
    app = rolled_out({"1.3.0": 0})
    newer = ReleaseIndex(APP_ID, (*STAGED_INDEX.releases, Release("1.4.0", "production", "1.4.0.zip", 100, SHA)))
    offered(fallback(staged(app), app, index=newer), "1.2.0")  # never a release above the one held back
    assert fallback(staged(app), app, version="1.2.0").why == staged(app).why  # none above the device: no review
    offered(fallback(staged(app), app, version="1.1.0"), "1.2.0")


def test_a_fallback_that_is_itself_held_back_is_passed_over() -> None:
    app = rolled_out({"1.3.0": 0, "1.2.0": 0})
    offered(fallback(staged(app), app), "1.1.0")
    halted = {"1.3.0": "x", "1.2.0": "x"}
    offered(fallback(staged(APP, halted), APP), "1.1.0")
    offered(fallback(staged(APP, {"1.3.0": "x"}), APP), "1.2.0")


def test_the_fallback_comes_from_the_devices_channel() -> None:
    app = rolled_out({"1.3.0": 0})
    result = fallback(staged(app), app, channel="beta")
    assert isinstance(result.outcome, Offer) and result.outcome.version == "1.2.5"
    offered(fallback(staged(app), app, channel="production"), "1.2.0")


def test_a_fallback_the_policy_refuses_leaves_the_device_up_to_date() -> None:
    app = rolled_out({"1.3.0": 0}, app=dataclasses.replace(APP, versions=Versions(blocked=("1.2.0",))))
    up_to_date(fallback(staged(app), app), "; 1.2.0 before it: 1.2.0 is a blocked version")
    offered(fallback(staged(app), rolled_out({"1.3.0": 0})), "1.2.0")


def test_a_broken_fallback_is_a_failure_not_up_to_date() -> None:
    app = rolled_out({"1.3.0": 0}, app=SIGNED)  # the app signs its bundles; the index release carries no signature
    result = fallback(staged(app), app)
    assert isinstance(result.outcome, Decline)
    assert (result.outcome.kind, result.outcome.reason) == (Kind.FAILED, Reason.SIGNATURE_INVALID)
    assert result.why == "1.3.0 is in a staged rollout not open to this device yet"


def test_the_fallback_is_confined_to_the_origins_hosts() -> None:
    app = rolled_out({"1.3.0": 0})
    result = fallback(staged(app), app, host="evil.example")
    assert isinstance(result.outcome, Decline)
    assert (result.outcome.kind, result.outcome.reason) == (Kind.FAILED, Reason.FOREIGN_HOST)
    offered(fallback(staged(app), app, host="cdn.example"), "1.2.0")


# --- what an update server's answer is to the gateway -------------------------------------------------------------

ERROR = {"error": "no_new_version_available", "message": "none", "kind": "up_to_date"}


def failed(endpoint: ServerEndpoint, status: int, body: object) -> None:
    refused(server_answer(endpoint, status, body, origin="cdn"), Reason.ORIGIN_ERROR, f"answered HTTP {status}")


def test_an_update_answer_is_reviewed_when_it_is_a_200_or_a_capgo_error() -> None:
    assert server_answer("updates", 200, {"version": "1.1.0"}, origin="cdn") == "use"
    assert server_answer("updates", 200, None, origin="cdn") == "use"  # the review refuses what is not JSON
    assert server_answer("updates", 400, ERROR, origin="cdn") == "use"
    failed("updates", 500, {"message": "boom"})
    failed("updates", 404, None)
    failed("updates", 302, {"version": "1.1.0"})


def test_stats_are_accepted_on_a_2xx_and_a_refused_batch_is_passed_on() -> None:
    assert server_answer("stats", 200, None, origin="cdn") == "use"
    assert server_answer("stats", 204, None, origin="cdn") == "use"
    assert server_answer("stats", 400, {"error": "invalid"}, origin="cdn") == "pass_on"
    failed("stats", 400, ["not", "an", "object"])
    failed("stats", 503, {"error": "down"})
    failed("stats", 302, None)


@pytest.mark.parametrize("endpoint", ["channel", "manifest_size"])
def test_channel_and_size_answers_are_passed_on_when_json_below_500(endpoint: ServerEndpoint) -> None:
    assert server_answer(endpoint, 200, {"channel": "beta"}, origin="cdn") == "pass_on"
    assert server_answer(endpoint, 400, [], origin="cdn") == "pass_on"
    failed(endpoint, 500, {"error": "down"})
    failed(endpoint, 200, None)


# --- verification.zip_scan ---------------------------------------------------------------------------------------


def test_zip_scan_follows_the_policy_for_whole_bundles_only() -> None:
    from gateway.core.zipscan import ZipRules

    rules = ZipRules()
    scanned = dataclasses.replace(APP, verification=Verification(zip_scan=rules))
    plan = plan_release(scanned, INDEX, "1.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP)
    assert isinstance(plan, DownloadPlan) and plan.zip_scan is rules
    assert plan.digest_factory() is not hashlib.sha256  # the scanning digest
    unscanned = plan_release(APP, INDEX, "1.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP)
    assert isinstance(unscanned, DownloadPlan) and unscanned.zip_scan is None
    assert unscanned.digest_factory() is hashlib.sha256
    ticket = ticket_plan(TICKET, scanned)
    assert isinstance(ticket, DownloadPlan) and ticket.zip_scan is rules
    delta = ticket_plan(dataclasses.replace(TICKET, file_name="assets/index.js"), scanned)
    assert isinstance(delta, DownloadPlan) and delta.zip_scan is None  # a delta file is no zip


def test_an_encrypted_release_by_version_is_refused_when_it_must_be_scanned() -> None:
    from gateway.core.releases import CapgoSignature
    from gateway.core.zipscan import ZipRules

    encrypted = Release("1.0.0", "production", "1.0.0.zip", 100, SHA, CapgoSignature("ab" * 256, "x:y"))
    index = ReleaseIndex(APP_ID, (encrypted,))
    scanned = dataclasses.replace(APP, verification=Verification(zip_scan=ZipRules()))
    refused(plan_release(scanned, index, "1.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP), Reason.ZIP_CONTENT)
    assert isinstance(plan_release(APP, index, "1.0.0", origin="cdn", max_bundle_bytes=GLOBAL_CAP), DownloadPlan)
