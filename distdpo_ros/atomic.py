"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it.

A reader (or a process killed half-way through a write) sees the old file or the new one, never
a torn one. Every file the project writes goes through :func:`atomic_writer` or
:func:`write_bytes_atomic`; checkpoint directories use the same idea one level up
(:mod:`distdpo_ros.checkpoint`).

Temporaries are named after their target and their writer (``.NAME.HOST-PID.XXXX.tmp``, or
``.NAME.partial-HOST-PID-XXXX`` for a directory), so that the first write of a later process into
the same folder removes, with a message, those whose writer was killed (:func:`temporary_name`,
:func:`clear_stale_temporaries`); a live writer's temporaries are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# This machine, in temporary names: a process id means nothing on another host of a shared disk.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
# `.NAME.` + optional kind + `HOST-PID` + `.` or `-`: the writer of a temporary. Kind `old-` is
# a checkpoint moved aside while its replacement is renamed in: restored, not removed
# (distdpo_ros.checkpoint).
_TEMPORARY = re.compile(r'^\..+\.(partial-|old-)?([0-9a-f]{8})-(\d+)[.-][^/]*$')
_cleared: set[str] = set()  # folders this process has already cleared


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import (os.umask can only be read by setting it)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A temporary file beside `path`; on success flushed, fsynced and renamed over `path`.

    Missing parent folders are created. The file gets the usual permissions of a new file (0666
    minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temporary_name(path.name), suffix='.tmp', dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, 'wb') as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as handle:
        handle.write(data)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entries to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_name(name: str, kind: str = '') -> str:
    """The prefix of a temporary of this process for target `name`: `.NAME.KIND HOST-PID.`
    (tempfile adds a random part). `kind` is '' for files, 'partial-' for directories, 'old-'
    for a checkpoint moved aside."""
    separator = '-' if kind else '.'
    return f'.{name}.{kind}{HOST_TAG}-{os.getpid()}{separator}'


def writer_is_gone(name: str) -> bool:
    """Whether `name` is a temporary (see :func:`temporary_name`) whose writer, a process of
    this machine, no longer runs."""
    match = _TEMPORARY.match(name)
    if match is None or match.group(2) != HOST_TAG:
        return False
    pid = int(match.group(3))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def clear_stale_temporaries(folder: str | os.PathLike, *, force: bool = False) -> list[str]:
    """Remove the temporaries in `folder` left by killed writers of this machine (once per folder
    and process unless `force`), saying so on stderr; return their names."""
    folder = os.path.abspath(folder)
    if folder in _cleared and not force:
        return []
    _cleared.add(folder)
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith('.')]
    except OSError:
        return []
    removed = []
    for entry in entries:
        if '.old-' in entry.name or not writer_is_gone(entry.name):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
    if removed:
        shown = ', '.join(removed[:3]) + (f' and {len(removed) - 3} more' if len(removed) > 3
                                          else '')
        print(f'distdpo: removed {len(removed)} temporary file(s) left in {folder} by an '
              f'interrupted write: {shown}', file=sys.stderr)
    return removed
