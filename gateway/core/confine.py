"""Confining a directory origin's files to the app's own folder, symlinks followed.

A file served for app A lies in `<origin root>/<A>/`, whatever the release index, an update answer or a download
ticket names. The location itself must be a plain relative path (`core/locations.location_problem`: no `..`, no
absolute path); this module owns the second half: the file actually opened, with every symlink followed, must
still be inside the app's folder (whose own symlinks are followed too). The shell opens the file and passes both
real paths in, except for a `direct_entry`: a plain name opened without following a symlink in its last part is an
entry of the folder itself, inside it with no real path to compare.

Pure: no file system access; paths are strings.
"""

from __future__ import annotations

import posixpath


def within(folder: str, path: str) -> bool:
    """Is the real (absolute, symlink-free) `path` strictly below the real `folder`?"""
    if not posixpath.isabs(folder) or not posixpath.isabs(path):
        return False
    folder, path = posixpath.normpath(folder), posixpath.normpath(path)
    return path != folder and path.startswith(folder.rstrip("/") + "/")


def direct_entry(location: str) -> bool:
    """Is `location` (a plain relative file, `core/locations.location_problem`) a name in the app's folder itself?
    Opened with its last part's symlink not followed (`O_NOFOLLOW`), such a file is inside the folder by
    construction. A deeper location could pass through a symlinked subfolder: its real path is compared."""
    return "/" not in location and location not in ("", ".", "..")
