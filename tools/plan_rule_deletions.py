# ruff: noqa: E501  (a table of source lines and their rule-less versions)
"""Delete each rule of the download and update plans in turn and name the tests in tests/core that catch it.

Each entry replaces one rule's text in gateway/core with a version that lacks the rule, runs tests/core, restores
the file and prints the failing tests ("NOT CAUGHT" if none). Usage: .venv/bin/python tools/plan_rule_deletions.py
[name fragment ...]. Exit status 1 if any deletion goes uncaught.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
P = "gateway/core/plans.py"
L = "gateway/core/locations.py"
T = "gateway/core/tickets.py"
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
]
only = sys.argv[1:]
uncaught = 0
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
    print(
        f"{name}: {'NOT CAUGHT' if not failed else ', '.join(failed[:3]) + (f' (+{len(failed) - 3})' if len(failed) > 3 else '')}",
        flush=True,
    )
sys.exit(1 if uncaught else 0)
