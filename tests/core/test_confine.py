"""Directory-origin files stay inside the app's folder once symlinks are followed (core/confine.py)."""

from __future__ import annotations

import pytest

from gateway.core.confine import direct_entry, within


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


@pytest.mark.parametrize("location", ["1.0.0.zip", "current.zip", "a"])
def test_a_plain_name_is_an_entry_of_the_folder_itself(location: str) -> None:
    assert direct_entry(location)


@pytest.mark.parametrize("location", ["sub/1.0.0.zip", "a/b/c.zip", "", ".", ".."])
def test_a_deeper_location_is_not_a_direct_entry(location: str) -> None:
    assert not direct_entry(location)  # a subfolder may be a symlink: its real path is compared
