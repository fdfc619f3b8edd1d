"""Directory-origin files stay inside the app's folder once symlinks are followed (core/confine.py)."""

from __future__ import annotations

import pytest

from gateway.core.confine import within


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
