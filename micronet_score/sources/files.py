"""Checks on a file before anything parses it: that it is a regular file (not a FIFO, a device, a directory or a
symbolic-link loop), and that a zip archive's declared sizes fit the archive (no decompression bomb)."""

from __future__ import annotations

import errno
import os
import stat
import zipfile
from pathlib import Path
from typing import IO

from micronet_score.errors import MicronetError

MAX_EXPANSION = 10
"""A zip archive's members may declare at most this many times the archive's size (plus MAX_SLACK) in all. torch
writes its records uncompressed (1x); a DEFLATE bomb declares thousands of times its size."""
MAX_SLACK = 1 << 20
MAX_MEMBERS = 1_000_000

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``path`` if it names a regular file (through symbolic links), else one clear error saying what it is."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MicronetError(f"{what} not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MicronetError(f"{path}: a loop of symbolic links, not a {what} file") from None
        raise MicronetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise MicronetError(f"{path}: a directory, not a {what} file")
    for test, kind in _KINDS:
        if test(mode):
            raise MicronetError(f"{path}: {kind}, not a {what} file")
    return path


def check_zip_sizes(file: str | os.PathLike | IO[bytes], size: int, source: str) -> None:
    """If ``file`` is a zip archive (as torch's checkpoints and ``.pt2`` programs are): one clear error when its
    members declare more bytes than :data:`MAX_EXPANSION` times its ``size``, or more than :data:`MAX_MEMBERS`
    members. Nothing is decompressed; a damaged archive is left to its reader to report."""
    try:
        if not zipfile.is_zipfile(file):
            return
        with zipfile.ZipFile(file) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return
    finally:
        if hasattr(file, "seek"):
            file.seek(0)
    if len(infos) > MAX_MEMBERS:
        raise MicronetError(f"{source}: a zip archive of {len(infos):,} members (at most {MAX_MEMBERS:,}); not loaded")
    declared = sum(info.file_size for info in infos)
    if declared > MAX_EXPANSION * size + MAX_SLACK:
        raise MicronetError(f"{source}: its zip members declare {declared:,} bytes uncompressed in a {size:,}-byte "
                            f"file (more than {MAX_EXPANSION}x: a decompression bomb?); not loaded")
