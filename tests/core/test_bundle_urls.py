"""Per-app bundle URL patterns (core/bundle_urls.py): validation at load, and which URLs belong to an app."""

from __future__ import annotations

import pytest

from gateway.core.bundle_urls import belongs, parse_pattern

PATTERNS = ("https://cdn.example.com/apps/{app_id}/",)
APP = "com.example.app"


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/apps/com.example.app/1.0.0.zip",
        "https://CDN.example.com:443/apps/com.example.app/v/1.0.0.zip?sig=abc",
        "https://cdn.example.com/apps/com.example.app/./1.0.0.zip",
    ],
)
def test_the_apps_own_urls_belong(url: str) -> None:
    assert belongs(url, PATTERNS, APP)


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/apps/com.other.app/1.0.0.zip",  # another app on the same host
        "https://cdn.example.com/apps/com.example.app.evil/1.0.0.zip",  # a prefix of the name is not the folder
        "https://cdn.example.com/apps/com.example.app/../com.other.app/1.0.0.zip",  # dot segments resolved first
        "https://cdn.example.com/apps/com.example.app/..%2fcom.other.app/1.0.0.zip",  # encoded separators
        "https://cdn.example.com/apps/com.example.app/%2e%2e/com.other.app/1.zip",
        "https://cdn.example.com/apps/com.example.app\\..\\com.other.app/1.zip",
        "https://cdn.example.com:8443/apps/com.example.app/1.0.0.zip",  # another port
        "https://other.example.com/apps/com.example.app/1.0.0.zip",
        "http://cdn.example.com/apps/com.example.app/1.0.0.zip",
        "https://user:pw@cdn.example.com/apps/com.example.app/1.0.0.zip",
        "https://cdn.example.com:99999/apps/com.example.app/1.zip",
        "not a url",
    ],
)
def test_other_urls_do_not_belong(url: str) -> None:
    assert not belongs(url, PATTERNS, APP)


def test_any_of_several_patterns_will_do() -> None:
    patterns = ("https://a.example.com/{app_id}/", "https://b.example.com/shared/{app_id}/bundles/")
    assert belongs("https://b.example.com/shared/com.example.app/bundles/1.zip", patterns, APP)
    assert not belongs("https://b.example.com/shared/com.example.app/1.zip", patterns, APP)


@pytest.mark.parametrize(
    "pattern", ["https://cdn.example.com/apps/{app_id}/", "https://cdn.example.com/", "https://h.example:8443/x/y/"]
)
def test_good_patterns_load(pattern: str) -> None:
    assert parse_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("http://cdn.example.com/apps/{app_id}/", "https://"),
        ("https://cdn.example.com/apps/{app_id}", "end with '/'"),
        ("https://cdn.example.com/apps/{app}/", "plain characters"),
        ("https://cdn.example.com/apps/../{app_id}/", "segments"),
        ("https://cdn.example.com/apps/%2e/", "plain characters"),
        ("https://cdn.example.com/a?x=1/", "query"),
        ("https://u:p@cdn.example.com/a/", "credentials"),
        ("cdn.example.com/apps/", "https://"),
    ],
)
def test_bad_patterns_are_refused_with_the_reason(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_pattern(pattern)
