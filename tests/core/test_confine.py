"""Directory-origin files stay inside the app's folder (core/confine.py)."""

from __future__ import annotations

import pytest

from gateway.core.confine import location_problem, within


@pytest.mark.parametrize("location", ["1.0.0.zip", "bundles/1.0.0.zip", "a/b/c/d.zip"])
def test_plain_relative_locations_pass(location: str) -> None:
    assert location_problem(location) is None


@pytest.mark.parametrize(
    "location",
    ["../other.app/1.0.0.zip", "/etc/passwd", "a/../../b.zip", "..", "a\\..\\b.zip", "", "a//b.zip", "./x.zip"],
)
def test_escaping_or_odd_locations_are_refused(location: str) -> None:
    problem = location_problem(location)
    assert problem is not None and "relative path" in problem


def test_a_file_below_the_folder_is_within() -> None:
    assert within("/srv/origin/com.a", "/srv/origin/com.a/1.0.0.zip")
    assert within("/srv/origin/com.a/", "/srv/origin/com.a/x/y.zip")


@pytest.mark.parametrize(
    "path",
    [
        "/srv/origin/com.a.evil/1.0.0.zip",  # a sibling whose name starts with the app id
        "/srv/origin/other.app/1.0.0.zip",
        "/srv/origin/com.a",  # the folder itself is not a file in it
        "/srv/origin/com.a/../other.app/1.zip",
        "relative/com.a/1.zip",
    ],
)
def test_a_file_elsewhere_is_not_within(path: str) -> None:
    assert not within("/srv/origin/com.a", path)
