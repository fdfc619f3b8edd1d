"""Confining a directory origin's files to the app's own folder.

Owns the rule that a file served for app A lies in `<origin root>/<A>/`, whatever the release index, an update
answer or a download ticket names: the location must be a plain relative path (`is_relative_file`: no `..`, no
absolute path, no backslash), and the file actually opened, with every symlink followed, must still be inside the
app's folder (whose own symlinks are followed too). The shell opens the file and passes both real paths in.

Pure: no file system access; paths are strings.
"""

from __future__ import annotations

import posixpath

from gateway.core.names import is_relative_file


def location_problem(location: str) -> str | None:
    """Why `location` cannot name a file of the app's folder, or None when it can."""
    if not is_relative_file(location):
        return f"{location[:128]!r} is not a plain relative path inside the app's folder"
    return None


def within(folder: str, path: str) -> bool:
    """Is the real (absolute, symlink-free) `path` strictly below the real `folder`?"""
    if not posixpath.isabs(folder) or not posixpath.isabs(path):
        return False
    folder, path = posixpath.normpath(folder), posixpath.normpath(path)
    return path != folder and path.startswith(folder.rstrip("/") + "/")
