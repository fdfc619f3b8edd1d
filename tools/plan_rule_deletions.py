# ruff: noqa: E501  (a table of source lines and their rule-less versions)
"""Delete each rule of the download and update plans in turn and name the tests in tests/core that catch it.

Each entry replaces one rule's text in gateway/core with a version that lacks the rule, runs tests/core, restores
the file and prints the failing tests ("NOT CAUGHT" if none). Usage: .venv/bin/python tools/plan_rule_deletions.py
[--markdown] [name fragment ...]; --markdown prints the table of docs/plan-rules.md. Exit status 1 if any deletion
goes uncaught.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
P = "gateway/core/plans.py"
L = "gateway/core/locations.py"
T = "gateway/core/tickets.py"
R = "gateway/core/rollout.py"
MUTATIONS = [
    (
        "admission (ticket download)",
        P,
        "    app = _admit(policies, peer, ticket.app_id)\n    if isinstance(app, Refusal):\n        return app\n    if ticket.origin",
        "    app = policies.apps[ticket.app_id]\n    if ticket.origin",
    ),
    (
        "admission (update check)",
        P,
        "    app = _admit(policies, peer, device.app_id)\n    if isinstance(app, Refusal):\n        return app\n    channel",
        "    app = policies.apps.get(device.app_id)\n    if app is None:\n        return Refusal(Reason.APP_UNKNOWN, 'x')\n    channel",
    ),
    (
        "channel (release download)",
        P,
        "if release is None or not channel_allowed(app, release.channel):",
        "if release is None:",
    ),
    (
        "channel (update check)",
        P,
        "    if not channel_allowed(app, channel):\n        decline",
        "    if False:\n        decline",
    ),
    (
        "channel (channel_self: self_set)",
        P,
        "    if not app.channels.self_set:\n        return Refusal",
        "    if False:\n        return Refusal",
    ),
    (
        "channel (channel_self: allowed)",
        P,
        '    if not channel_allowed(app, channel):\n        return Refusal(Reason.CHANNEL_NOT_ALLOWED, f"channel',
        '    if False:\n        return Refusal(Reason.CHANNEL_NOT_ALLOWED, f"channel',
    ),
    (
        "channel (channel_self: name shape)",
        P,
        "    if not (isinstance(channel, str) and is_channel(channel)):",
        "    if not isinstance(channel, str):",
    ),
    (
        "channel (current channel)",
        P,
        "    if default_channel is not None and channel_allowed(app, default_channel):",
        "    if default_channel is not None:",
    ),
    (
        "size cap (app limit)",
        P,
        "    return max_bundle_bytes if own is None else min(max_bundle_bytes, own)",
        "    return max_bundle_bytes",
    ),
    ("size cap (release download)", P, '    too_big = _over_cap(release.size, cap, "release")', "    too_big = None"),
    ("size cap (ticket download)", P, '    too_big = _over_cap(ticket.size, cap, "the bundle")', "    too_big = None"),
    (
        "size cap (ticket without size, while streaming)",
        P,
        "        Expectation(ticket.sha256, ticket.size, max_bytes=cap),",
        "        Expectation(ticket.sha256, ticket.size),",
    ),
    (
        "origin confinement (ticket)",
        P,
        "    if ticket.origin not in origin_hosts or ticket.origin != app.origin:",
        "    if ticket.origin not in origin_hosts:",
    ),
    (
        "location confinement (ticket)",
        P,
        "    problem = location_problem(ticket.location, origin_hosts[ticket.origin])\n",
        "    problem = None\n",
    ),
    (
        "location: directory file below the app folder",
        L,
        "        if is_relative_file(location):\n            return None",
        "        return None",
    ),
    ("location: https only", L, '    if parts.scheme != "https":', "    if False:"),
    (
        "location: origin hosts",
        L,
        "    if host is None or host.lower() not in hosts or parts.username or parts.password:",
        "    if host is None or parts.username or parts.password:",
    ),
    (
        "location: no credentials",
        L,
        "    if host is None or host.lower() not in hosts or parts.username or parts.password:",
        "    if host is None or host.lower() not in hosts:",
    ),
    (
        "Range form",
        P,
        "    if match is None:\n        return Refusal(Reason.RANGE_NOT_SATISFIABLE",
        "    if match is None:\n        return None\n        return Refusal(Reason.RANGE_NOT_SATISFIABLE",
    ),
    ("Range bounds", P, "    if size is None or start >= size:", "    if size is None:"),
    ("declared size (against the expected one)", P, "        if declared_size != expect.size:", "        if False:"),
    (
        "declared size (within the cap when no size was known)",
        P,
        "    if expect.max_bytes is not None and declared_size > expect.max_bytes:",
        "    if False:",
    ),
    (
        "ticket: MAC",
        T,
        '    if not hmac.compare_digest(mac.encode("ascii"), expected.encode("ascii")):',
        "    if False:",
    ),
    ("ticket: expiry", T, "    if now >= ticket.expires:", "    if False:"),
    ("ticket: identity", T, "    if not hmac.compare_digest(ticket.identity, identity):", "    if False:"),
    (
        "ticket: key id",
        T,
        '    if key is None:\n        raise TicketError(f"ticket signed',
        '    if key is None:\n        key = keys[0]\n    if False:\n        raise TicketError(f"ticket signed',
    ),
    (
        "session key of an encrypted download",
        P,
        "    return Refusal(Reason.SIGNATURE_INVALID, \"the bundle's session key",
        "    return None\n    return Refusal(Reason.SIGNATURE_INVALID, \"the bundle's session key",
    ),
    ("Host header", P, "    if host_header is None or host_of(host_header) is None:", "    if host_header is None:"),
    ("tickets.public_url wins over Host", P, "    if public_url:\n        return public_url\n", ""),
    (
        "ticket: MAC compared as the text sealed (not decoded bytes)",
        T,
        '    if not hmac.compare_digest(mac.encode("ascii"), expected.encode("ascii")):',
        "    if not hmac.compare_digest(_unb64(mac), _unb64(expected)):",
    ),
    (
        "offer: a file without a digest keeps the origin's url",
        P,
        "    if offer.digest is None:\n        return OfferPlan(",
        "    if False:\n        return OfferPlan(",
    ),
    ("offer: tickets expire after tickets.ttl", P, "    expires = int(now) + ttl", "    expires = int(now) + 10 * ttl"),
    (
        "offer: tickets bound to the client",
        P,
        "            identity=peer.identity.sha256,\n            expires=expires,",
        '            identity="0" * 64,\n            expires=expires,',
    ),
    # what an update server's answer is to the gateway (server_answer)
    (
        "server answer: an update answer of 200 is reviewed",
        P,
        '        usable = status == 200 or (isinstance(body, dict) and "error" in body)',
        '        usable = isinstance(body, dict) and "error" in body',
    ),
    (
        "server answer: an update server's Capgo error is reviewed",
        P,
        '        usable = status == 200 or (isinstance(body, dict) and "error" in body)',
        "        usable = status == 200",
    ),
    (
        "server answer: stats accepted on a 2xx",
        P,
        '        if 200 <= status < 300:\n            verdict = "use"',
        '        if False:\n            verdict = "use"',
    ),
    (
        "server answer: only a 4xx refusal of stats is passed on",
        P,
        '"pass_on" if 400 <= status < 500 and isinstance(body, dict) else None',
        '"pass_on" if isinstance(body, dict) else None',
    ),
    (
        "server answer: a refusal of stats is a JSON object",
        P,
        '"pass_on" if 400 <= status < 500 and isinstance(body, dict) else None',
        '"pass_on" if 400 <= status < 500 else None',
    ),
    (
        "server answer: channel and size answers are JSON",
        P,
        '"pass_on" if isinstance(body, dict | list) and status < 500 else None',
        '"pass_on" if status < 500 else None',
    ),
    (
        "server answer: channel and size answers below 500",
        P,
        '"pass_on" if isinstance(body, dict | list) and status < 500 else None',
        '"pass_on" if isinstance(body, dict | list) else None',
    ),
    # staged rollouts and halts (plan_staged, plan_fallback and the core/rollout rules they apply)
    (
        "staged: a halted version is held back",
        R,
        "    if version in halted:\n        return HALTED",
        "    if False:\n        return HALTED",
    ),
    (
        "staged: a device outside the rollout is held back",
        R,
        "    return percent is None or position(app_id, version, device) < percent",
        "    return True",
    ),
    (
        "staged: identity certificate is the certificate alone",
        R,
        '    if identity == "certificate":\n        return cert_sha256',
        "    if False:\n        return cert_sha256",
    ),
    (
        "staged: identity device is the (certificate, device_id) pair",
        R,
        '    return hashlib.sha256(f"{cert_sha256}/{device_id.lower()}".encode()).hexdigest()',
        "    return cert_sha256",
    ),
    (
        "fallback: only with offer_previous",
        P,
        "    if not held.look_back or index is None:",
        "    if index is None:",
    ),
    (
        "fallback: the device's channel",
        R,
        "        if release.channel != channel:\n            continue\n",
        "",
    ),
    (
        "fallback: older than the held-back offer",
        R,
        "        if floor < version < ceiling and",
        "        if floor < version and",
    ),
    (
        "fallback: newer than the device",
        R,
        "        if floor < version < ceiling and",
        "        if version < ceiling and",
    ),
    (
        "fallback: not itself held back",
        R,
        " and usable(release.version):",
        ":",
    ),
    (
        "fallback: one the policy refuses leaves the device up to date",
        P,
        "    if not isinstance(outcome, Decline) or outcome.kind is Kind.FAILED:\n        return Fallback(",
        "    if True:\n        return Fallback(",
    ),
    (
        "fallback: a broken one is a failure",
        P,
        "    if not isinstance(outcome, Decline) or outcome.kind is Kind.FAILED:\n        return Fallback(",
        "    if not isinstance(outcome, Decline):\n        return Fallback(",
    ),
    (
        "fallback: confined to the origin's hosts",
        P,
        "high_water=None, hosts=hosts, served=served)",
        "high_water=None, hosts=None, served=served)",
    ),
    (
        "halt: not before min_devices",
        R,
        "    return tried >= halt.min_devices and tried > 0 and",
        "    return tried > 0 and",
    ),
    (
        "halt: at the failure ratio",
        R,
        " and failed >= halt.failure_ratio * tried",
        " and failed >= 0",
    ),
    (
        "halt: failures count as failed",
        R,
        '    if action in FAILURE_ACTIONS:\n        return "failed"',
        '    if False:\n        return "failed"',
    ),
    (
        "zip scan (release download)",
        P,
        "    return DownloadPlan(app.app_id, version, origin, release.file, expect, zip_scan=rules)",
        "    return DownloadPlan(app.app_id, version, origin, release.file, expect)",
    ),
    (
        "zip scan (ticket download, whole bundles only)",
        P,
        "        zip_scan=app.verification.zip_scan if ticket.file_name is None else None,",
        "        zip_scan=app.verification.zip_scan,",
    ),
    (
        "zip scan (encrypted release by version refused)",
        P,
        "    if rules is not None and release.capgo is not None:",
        "    if False:",
    ),
]
markdown = "--markdown" in sys.argv
only = [a for a in sys.argv[1:] if a != "--markdown"]
uncaught = 0
if markdown:
    print("| rule deleted | file | tests that fail without it |\n| --- | --- | --- |")
for name, path, old, new in MUTATIONS:
    if only and not any(o in name for o in only):
        continue
    f = ROOT / path
    orig = f.read_text()
    assert orig.count(old) == 1, (name, orig.count(old))
    f.write_text(orig.replace(old, new))
    try:
        r = subprocess.run(
            [str(ROOT / ".venv/bin/pytest"), "-q", "-p", "no:cacheprovider", "tests/core", "-o", "addopts="],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        f.write_text(orig)
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in r.stdout.splitlines() if ln.startswith("FAILED ")]
    uncaught += not failed
    shown = (
        "NOT CAUGHT" if not failed else ", ".join(failed[:3]) + (f" (+{len(failed) - 3})" if len(failed) > 3 else "")
    )
    if markdown:
        print(
            f"| {name} | `{path}` | {shown if not failed else ', '.join(f'`{t}`' for t in failed[:3])}"
            f"{f' (+{len(failed) - 3} more)' if len(failed) > 3 else ''} |",
            flush=True,
        )
    else:
        print(f"{name}: {shown}", flush=True)
sys.exit(1 if uncaught else 0)
