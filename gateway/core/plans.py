"""Plans: what a download or an update check will do, decided from plain values before a byte moves.

Owns the rules between parsing a request and acting on it: admission (through `core/policy.admit`), the channel,
the size cap, origin and location confinement, the Range form, the ticket checks (`core/tickets.py`), the session
key of an encrypted download, and the Host that ticket urls name. Handlers parse the request, call a plan function,
and carry out the plan it returns; a `Refusal` is returned, not raised, so the caller decides how to answer and
count it. Each rule has a pass and a fail test in `tests/core/test_plans.py`. Pure: the clock, keys, configured
origins and limits are passed in.

The order of one download:   parse -> `plan_bundle` or `redeem_ticket` + `plan_ticket_download` -> open the origin
                             -> `plan_response` (with the size the origin declared) -> stream through the verifier.
The order of an update check: parse -> `plan_update` -> ask the origin (`server_answer`) -> `core/review.review_answer`
                             -> `plan_staged` (held back by a rollout or a halt? then read the index
                             -> `plan_fallback`) -> `plan_offer` (ticket urls) -> answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.core import digests
from gateway.core.capgo import DeviceInfo, Kind
from gateway.core.capgo_crypto import CapgoCryptoError, open_session_key, recover_checksum
from gateway.core.locations import location_problem
from gateway.core.names import host_of, is_channel
from gateway.core.policy import AppPolicy, Peer, PolicySet, admit, channel_allowed
from gateway.core.rates import MinRate
from gateway.core.reasons import Reason, Refusal
from gateway.core.releases import ReleaseIndex
from gateway.core.review import (
    Decline,
    Offer,
    Outcome,
    Served,
    load_public_keys,
    new_version_body,
    release_answer,
    review_answer,
)
from gateway.core.rollout import HALTED, NO_ROLLOUT, Rollout, device_key, held_back, previous_release
from gateway.core.tickets import Ticket, TicketError, TicketKey, open_ticket, seal
from gateway.core.verify import Digest, Expectation
from gateway.core.zipscan import ZipRules

_RANGE_RE = re.compile(r"bytes=(\d{1,15})-")
_SHOWN_NAME_RE = re.compile(r"[^A-Za-z0-9._-]")


# --- the rules, one function each --------------------------------------------------------------------------------


def _admit(policies: PolicySet, peer: Peer, app_id: str) -> AppPolicy | Refusal:
    try:
        return admit(policies, peer, app_id)
    except Refusal as refusal:
        return refusal


def size_cap(app: AppPolicy, max_bundle_bytes: int) -> int:
    """The most bytes one download of `app` may have: the gateway's `limits.max_bundle_bytes`, lowered by the
    app's `verification.max_bundle_bytes`."""
    own = app.verification.max_bundle_bytes
    return max_bundle_bytes if own is None else min(max_bundle_bytes, own)


def _over_cap(size: int | None, cap: int, what: str) -> Refusal | None:
    if size is not None and size > cap:
        return Refusal(Reason.SIZE_EXCEEDED, f"{what} is {size} bytes, above the limit of {cap}")
    return None


def range_start(header: str | None) -> int | Refusal | None:
    """N of `Range: bytes=N-`; None without a Range header. Any other form is refused: the plugin resumes with
    exactly that form, and a 200 with the whole file would be appended to what it has."""
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        return Refusal(Reason.RANGE_NOT_SATISFIABLE, "only a single open-ended range (bytes=N-) is served")
    return int(match.group(1))


def ticket_base_url(public_url: str | None, host_header: str | None) -> str | Refusal:
    """Where devices reach the gateway: `tickets.public_url`, else the request's Host when it is a plain host."""
    if public_url:
        return public_url
    if host_header is None or host_of(host_header) is None:
        return Refusal(Reason.BAD_REQUEST, "the Host header is not a host name (set tickets.public_url)")
    return f"https://{host_header}"


def _aes_key(ticket: Ticket, app: AppPolicy) -> tuple[bytes, bytes] | Refusal | None:
    """The bundle's AES key and IV, recovered with the public key of the app that signed its checksum."""
    if ticket.session_key is None:
        return None
    for key in load_public_keys(app.verification.public_keys):
        try:
            if ticket.checksum is not None and recover_checksum(key, ticket.checksum) != ticket.sha256:
                continue
            return open_session_key(key, ticket.session_key)
        except CapgoCryptoError:
            continue
    return Refusal(Reason.SIGNATURE_INVALID, "the bundle's session key does not open with a public key of the app")


# --- downloads ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DownloadPlan:
    """A download the gateway will serve: from which origin and location, verified against what, how delivered."""

    app_id: str
    version: str
    origin: str  # origin name in gateway.yaml
    location: str  # a file below the app's folder of a directory origin, or an https url on the origin's hosts
    # (a download by version names the index's file; the origin locates it: `Origin.locate`)
    expect: Expectation
    range_from: int | None = None  # `Range: bytes=N-`: a 206 of the bytes from N on, the prefix still hashed
    content_type: str = "application/zip"
    aes: tuple[bytes, bytes] | None = field(default=None, repr=False)  # decrypt before hashing (Capgo encrypted)
    brotli: bool = False  # decompress before hashing (a delta manifest `.br` file)
    zip_scan: ZipRules | None = None  # scan the plain zip as it is hashed (`verification.zip_scan`)

    def digest_factory(self) -> Callable[[], Digest]:
        scan = None if self.zip_scan is None else (self.zip_scan, self.expect.sha256)
        return digests.pipeline(aes=self.aes, brotli=self.brotli, zip_scan=scan)


def plan_release(
    app: AppPolicy,
    index: ReleaseIndex,
    version: str,
    *,
    origin: str,
    max_bundle_bytes: int,
    range_header: str | None = None,
) -> DownloadPlan | Refusal:
    """GET /bundles/{app}/{version}.zip of an admitted client, once the origin's release index is known: the release
    must exist on a channel the policy allows and fit the size cap, and the Range be one the gateway can answer
    exactly (`range_start`, as for a ticket download: `bytes=N-`, the prefix still hashed)."""
    release = index.find(version)
    if release is None or not channel_allowed(app, release.channel):
        return Refusal(Reason.RELEASE_UNKNOWN, f"{app.app_id} has no release {version} on an allowed channel")
    start = range_start(range_header)
    if isinstance(start, Refusal):
        return start
    cap = size_cap(app, max_bundle_bytes)
    too_big = _over_cap(release.size, cap, "release")
    if too_big is not None:
        return too_big
    rules = app.verification.zip_scan
    if rules is not None and release.capgo is not None:
        return Refusal(
            Reason.ZIP_CONTENT,
            f"verification.zip_scan: release {version} is encrypted and its download by version is not decrypted "
            "here; devices get it through an update answer, whose download is decrypted and scanned",
        )
    expect = Expectation(release.sha256, release.size, max_bytes=cap)
    return DownloadPlan(app.app_id, version, origin, release.file, expect, range_from=start, zip_scan=rules)


def redeem_ticket(token: str, keys: Sequence[TicketKey], *, now: float, peer: Peer) -> Ticket | Refusal:
    """The ticket a download url carries, if it is this gateway's, unaltered, unexpired and issued to `peer`."""
    try:
        return open_ticket(token, keys, now=now, identity=peer.identity.sha256)
    except TicketError as exc:
        return Refusal(Reason.TICKET_INVALID, str(exc))


def plan_ticket_download(
    ticket: Ticket,
    policies: PolicySet,
    peer: Peer,
    *,
    origin_hosts: Mapping[str, frozenset[str] | None],
    max_bundle_bytes: int,
    range_header: str | None,
) -> DownloadPlan | Refusal:
    """GET /bundles/t/{ticket}/{name} with an opened ticket: the client is admitted again (a policy may have
    changed since), the ticket's origin still serves the app, its location is confined to that origin, the Range is
    one the gateway can answer exactly, an encrypted bundle's key opens with the app's public key, and the size
    fits the cap. `origin_hosts`: each configured origin's hosts (None for a directory origin)."""
    app = _admit(policies, peer, ticket.app_id)
    if isinstance(app, Refusal):
        return app
    if ticket.origin not in origin_hosts or ticket.origin != app.origin:
        return Refusal(Reason.TICKET_INVALID, f"the ticket's origin {ticket.origin!r} no longer serves {app.app_id}")
    problem = location_problem(ticket.location, origin_hosts[ticket.origin])
    if problem is not None:
        return Refusal(Reason.TICKET_INVALID, f"the ticket's location is refused: {problem[1]}")
    start = range_start(range_header)
    if isinstance(start, Refusal):
        return start
    aes = _aes_key(ticket, app)
    if isinstance(aes, Refusal):
        return aes
    cap = size_cap(app, max_bundle_bytes)
    too_big = _over_cap(ticket.size, cap, "the bundle")
    if too_big is not None:
        return too_big
    return DownloadPlan(
        ticket.app_id,
        ticket.version,
        ticket.origin,
        ticket.location,
        Expectation(ticket.sha256, ticket.size, max_bytes=cap),
        range_from=start,
        content_type="application/zip" if ticket.file_name is None else "application/octet-stream",
        aes=aes,
        brotli=(ticket.file_name or "").endswith(".br"),
        zip_scan=app.verification.zip_scan if ticket.file_name is None else None,  # a whole bundle, not a delta file
    )


class Unsatisfiable(Refusal):
    """A range that starts at or past the end of the file: a 416 naming the size, when it is known."""

    def __init__(self, start: int, size: int | None) -> None:
        shown = size if size is not None else "an unknown number of"
        super().__init__(Reason.RANGE_NOT_SATISFIABLE, f"range from byte {start} of {shown} bytes")
        self.size = size


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    """The answer's shape once the origin has opened: status, what the verifier expects, what it sends."""

    status: int  # 200, or 206 for a range
    expect: Expectation
    send_from: int = 0
    content_length: int | None = None  # None: chunked (the size is known to nobody)
    content_range: str | None = None


def settle_size(expect: Expectation, declared_size: int | None) -> Expectation | Refusal:
    """The size the origin declares (Content-Length, or a file's size) against the expected one: a different size
    is refused before a byte is sent; when nothing else gave the size, the declared one becomes the exact size (the
    answer carries it, and bytes past it or short of it fail the download), within the cap."""
    if declared_size is None:
        return expect
    if expect.size is not None:
        if declared_size != expect.size:
            reason = Reason.SIZE_EXCEEDED if declared_size > expect.size else Reason.SHORT_BODY
            return Refusal(reason, f"origin declares {declared_size} bytes, the index says {expect.size}")
        return expect
    if expect.max_bytes is not None and declared_size > expect.max_bytes:
        return Refusal(
            Reason.SIZE_EXCEEDED, f"origin declares {declared_size} bytes, above the limit of {expect.max_bytes}"
        )
    return Expectation(expect.sha256, declared_size, expect.max_bytes)


def plan_response(plan: DownloadPlan, declared_size: int | None) -> ResponsePlan | Refusal:
    """Check the size the origin declares against the expected one (`settle_size`), and settle the range."""
    expect = settle_size(plan.expect, declared_size)
    if isinstance(expect, Refusal):
        return expect
    start = plan.range_from
    if start is None:
        return ResponsePlan(200, expect, 0, expect.size)
    size = expect.size if expect.size is not None else declared_size
    if size is None or start >= size:
        return Unsatisfiable(start, size)
    expect = Expectation(expect.sha256, size, expect.max_bytes)
    return ResponsePlan(206, expect, start, size - start, f"bytes {start}-{size - 1}/{size}")


WHOLE_BODY_BYTES = 64 * 1024  # a body up to this size may be read whole and verified before its answer starts


def read_whole(shape: ResponsePlan, origin_rate: MinRate) -> float | None:
    """Whether a body is read whole and verified before its answer starts (headers and body then leave in one
    write: no stream, no tail holdback needed, since the client gets nothing of a body that fails), and how many
    seconds the origin has for all of it; None: stream it through the verifier's tail holdback.

    Only a body of known size up to `WHOLE_BODY_BYTES`, and only where one deadline is exactly the streaming
    path's minimum-rate rule (`core/rates.py`): a body smaller than one window's worth of `origin_min_rate` fails
    that rule once a whole window of waiting on the origin has passed (and while it is read whole the gateway waits
    on nothing else), so the origin has `rate_window` seconds; with the rule off, `math.inf`. A larger body, or one
    a lowered rate could make a stream wait on longer, is streamed."""
    size = shape.expect.size
    if size is None or size > WHOLE_BODY_BYTES or shape.content_length is None:
        return None
    if not origin_rate.enabled:
        return math.inf
    if size >= origin_rate.need:
        return None
    return origin_rate.window


# --- update checks -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    """An admitted update check: which app policy, which channel, the origin to ask; or, with `decline`, the answer
    already decided without asking the origin."""

    app: AppPolicy
    channel: str
    origin: str
    decline: Decline | None = None


def plan_update(policies: PolicySet, peer: Peer, device: DeviceInfo) -> UpdatePlan | Refusal:
    """POST /updates: admit the client to the app, and settle the channel (the device's own, else the policy's
    default) before the origin is asked; a channel the policy does not allow is a Capgo `blocked` answer."""
    app = _admit(policies, peer, device.app_id)
    if isinstance(app, Refusal):
        return app
    channel = device.default_channel or app.channels.default
    if not channel_allowed(app, channel):
        decline = Decline(
            "channel_not_allowed",
            f"channel {channel} is not allowed for {app.app_id}",
            Kind.BLOCKED,
            Reason.CHANNEL_NOT_ALLOWED,
        )
        return UpdatePlan(app, channel, app.origin, decline)
    return UpdatePlan(app, channel, app.origin)


@dataclass(frozen=True, slots=True)
class HeldBack:
    """An offer this device may not have yet: why (`cause`: `halted` or `not_in_rollout`, and a sentence), and
    whether to look for a release before it in the release index (`look_back`: `halt.offer_previous`)."""

    version: str  # the offer held back
    cause: str
    why: str
    look_back: bool
    rollout: Rollout
    device: str  # who the device is (`core/rollout.device_key`)
    halts: Mapping[str, object] = field(repr=False)


def plan_staged(
    app: AppPolicy, offer: Offer, *, cert_sha256: str, device_id: str, halts: Mapping[str, object]
) -> HeldBack | None:
    """POST /updates, after the review accepted an offer: None if it may go to this device; else why not (the
    version is halted, or its staged rollout does not include the device yet). An operator's halt holds for every
    app, a rollout only for apps with a `rollout` block; who the device is follows `rollout.identity`."""
    rollout = app.rollout or NO_ROLLOUT
    who = device_key(cert_sha256, device_id, rollout.identity)
    cause = held_back(rollout, app.app_id, offer.version, who, halts)
    if cause is None:
        return None
    state = "halted" if cause == HALTED else "in a staged rollout not open to this device yet"
    why = f"{offer.version} is {state}"
    return HeldBack(offer.version, cause, why, rollout.halt.offer_previous, rollout, who, halts)


@dataclass(frozen=True, slots=True)
class Fallback:
    """What a held-back device gets instead of the offer, the file the answer names (for its tickets), and why."""

    outcome: Outcome
    served: Served | None
    why: str


def plan_fallback(
    held: HeldBack,
    app: AppPolicy,
    device: DeviceInfo,
    channel: str,
    index: ReleaseIndex | None,
    *,
    locate: Callable[[str], str],
    hosts: frozenset[str] | None,
) -> Fallback:
    """The newest release of the device's channel in the release index (None: none could be read) that is older
    than the held-back offer, newer than the device, and neither halted nor outside its own rollout; reviewed like
    any offer, except that the channel high-water mark (which the held-back offer already raised) does not refuse
    the gateway's own lower choice. A fallback whose review fails (`kind: failed`, a broken release) is that
    failure; one the policy refuses leaves the device up to date, as does no fallback or `offer_previous: false`.
    `locate`: where the origin keeps an index file (`Origin.locate`); `hosts`: the hosts its urls may name."""
    if not held.look_back or index is None:
        return _stay(held.why)
    release = previous_release(
        index,
        channel,
        device.version_name,
        held.version,
        lambda version: held_back(held.rollout, app.app_id, version, held.device, held.halts) is None,
    )
    if release is None:
        return _stay(held.why)
    answer = release_answer(release)
    answer["url"] = locate(release.file)
    served = Served(release.sha256, release.size)
    keys = load_public_keys(app.verification.public_keys)
    outcome = review_answer(answer, device, app, public_keys=keys, high_water=None, hosts=hosts, served=served)
    if not isinstance(outcome, Decline) or outcome.kind is Kind.FAILED:
        return Fallback(outcome, served, held.why)
    return _stay(f"{held.why}; {release.version} before it: {outcome.message}")


def _stay(why: str) -> Fallback:
    return Fallback(Decline("no_new_version_available", why, Kind.UP_TO_DATE), None, why)


ServerEndpoint = Literal["updates", "stats", "channel", "manifest_size"]


def server_answer(
    endpoint: ServerEndpoint, status: int, body: object, *, origin: str
) -> Literal["use", "pass_on"] | Refusal:
    """What an update server's answer (its status and parsed JSON body, None if not JSON) is to the gateway:

    - `updates`: a 200, or a Capgo error object whatever the status, goes to the review (`use`);
    - `stats`: a 2xx accepts the events (`use`); a 4xx with a JSON object refuses the batch, and the device gets
      that answer (`pass_on`: the plugin drops the batch instead of retrying it);
    - `channel`, `manifest_size`: a JSON object or list below 500 is the device's answer as it is (`pass_on`);

    anything else is the origin's failure (`origin_error`; the plugin retries or reports a failure)."""
    if endpoint == "updates":
        usable = status == 200 or (isinstance(body, dict) and "error" in body)
        verdict: Literal["use", "pass_on"] | None = "use" if usable else None
    elif endpoint == "stats":
        if 200 <= status < 300:
            verdict = "use"
        else:
            verdict = "pass_on" if 400 <= status < 500 and isinstance(body, dict) else None
    else:
        verdict = "pass_on" if isinstance(body, dict | list) and status < 500 else None
    if verdict is None:
        name = {"updates": "update", "manifest_size": "size-estimate"}.get(endpoint, endpoint)
        return Refusal(Reason.ORIGIN_ERROR, f"origin {origin}: {name} endpoint answered HTTP {status}")
    return verdict


def channel_self_problem(app: AppPolicy, method: str, channel: object) -> Refusal | None:
    """/channel_self: may the device set (POST) or unset (DELETE) its own channel, and to this one?
    `channel_not_allowed` is answered the backend's way (400 `channel_set_from_plugin_not_allowed`)."""
    if method not in ("POST", "DELETE"):
        return None
    if not app.channels.self_set:
        return Refusal(Reason.CHANNEL_NOT_ALLOWED, f"{app.app_id} does not allow devices to set their own channel")
    if method == "DELETE":
        return None
    if not (isinstance(channel, str) and is_channel(channel)):
        return Refusal(Reason.BAD_REQUEST, "channel is required and must be a channel name")
    if not channel_allowed(app, channel):
        return Refusal(Reason.CHANNEL_NOT_ALLOWED, f"channel {channel} is not allowed for {app.app_id}")
    return None


def current_channel(app: AppPolicy, default_channel: str | None) -> str:
    """The channel a device is on, as the gateway answers it without a channel endpoint."""
    if default_channel is not None and channel_allowed(app, default_channel):
        return default_channel
    return app.channels.default


@dataclass(frozen=True, slots=True)
class OfferPlan:
    """The answer a device gets for an accepted offer, and how many tickets it carries."""

    body: dict[str, Any]
    tickets: int


def _shown_name(name: str) -> str:
    return _SHOWN_NAME_RE.sub("_", name.rsplit("/", 1)[-1])[:128] or "file"


def plan_offer(
    offer: Offer,
    served: Served | None,
    *,
    app_id: str,
    origin: str,
    peer: Peer,
    key: TicketKey,
    now: float,
    ttl: int,
    public_url: str | None,
    host_header: str | None,
) -> OfferPlan | Refusal:
    """The offer with a ticket url for each verified download in place of the origin's url; files the review could
    not give a digest (`require_checksum: false`) keep the origin's url. Tickets are bound to `peer` and expire."""
    if offer.digest is None:
        return OfferPlan(new_version_body(offer, offer.location, [e.location for e in offer.manifest]), 0)
    base = ticket_base_url(public_url, host_header)
    if isinstance(base, Refusal):
        return base
    expires = int(now) + ttl
    session_key = offer.session_key if offer.decrypt else None
    issued = 0

    def url(location: str, digest: str, file_name: str | None, size: int | None, checksum: str | None) -> str:
        nonlocal issued
        ticket = Ticket(
            app_id=app_id,
            version=offer.version,
            sha256=digest,
            origin=origin,
            location=location,
            identity=peer.identity.sha256,
            expires=expires,
            size=size,
            checksum=checksum,
            session_key=session_key,
            file_name=file_name,
        )
        issued += 1
        shown = _shown_name(file_name) if file_name else f"{_shown_name(offer.version)}.zip"
        return f"{base}/bundles/t/{seal(ticket, key)}/{shown}"

    main = url(
        offer.location, offer.digest, None, served.size if served else None, offer.checksum if offer.decrypt else None
    )
    manifest = [
        e.location if e.digest is None else url(e.location, e.digest, e.file_name, None, None) for e in offer.manifest
    ]
    return OfferPlan(new_version_body(offer, main, manifest), issued)
