"""One process per run folder: training, evaluation and the demo lock their --out.

The lock is ``OUT/.distdpo-lock``, held with ``flock`` by the process that writes the folder
(rank 0 under torchrun) for as long as it runs; it holds who that is (pid, host, command, start
time) as JSON. A second process on the same folder is refused in one line naming the holder. The
kernel drops an flock when its process dies, however it dies, so the lock of a killed run is
free: the next run takes it over and says whose it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from distdpo_ros.errors import UserError

LOCK_FILE = '.distdpo-lock'


class RunLock:
    """The lock of one run folder (see the module docstring); a context manager."""

    def __init__(self, folder: str | os.PathLike, command: str, enabled: bool = True) -> None:
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_FILE
        self.enabled = enabled  # False on the torchrun ranks that do not hold the lock
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise UserError naming its holder; creates the folder if needed."""
        if self.held or not self.enabled:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f'--out {self.folder}: is a file; give a folder')
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for _ in range(100):  # retried only while other processes release and recreate it
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise UserError(f'--out {self.folder}: in use by {_describe(holder)}; wait '
                                    'for it to finish or choose another folder') from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)  # released and removed by its holder meanwhile: open the new one
            else:
                raise UserError(f'--out {self.folder}: could not take its lock {self.path}')
            previous = _read_holder(fd)
            record = {'pid': os.getpid(), 'host': socket.gethostname(), 'command': self.command,
                      'started': time.strftime('%Y-%m-%d %H:%M:%S')}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            raise UserError(f'--out {self.folder}: cannot lock the folder ({exc.strerror or exc})'
                            ) from None
        self._fd = fd
        if previous:
            print(f'distdpo: took over the lock of {self.folder} from {_describe(previous)}, '
                  'which no longer runs', file=sys.stderr)
        return self

    def release(self) -> None:
        """Remove the lock file and let go of the lock (removed first: see acquire's check)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    """The JSON record in a lock file ({} when empty or unreadable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode('utf-8', 'replace') or '{}')
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return 'another process'
    host = holder.get('host')
    where = '' if host in (None, socket.gethostname()) else f' on {host}'
    command = holder.get('command') or 'a distdpo run'
    return f'`{command}` (pid {holder.get("pid")}{where}, since {holder.get("started")})'


def lock_run_folder(folder: str | os.PathLike, command: str, dist: Any = None) -> RunLock:
    """Lock `folder` for this run: in one process, or on rank 0 of a torchrun group (`dist`, a
    :class:`~distdpo_training.engine.distributed.Dist`), every rank then raising the refusal."""
    from distdpo_training.engine import distributed

    lock = RunLock(folder, command, enabled=dist is None or dist.is_main)
    error: UserError | None = None
    try:
        lock.acquire()
    except UserError as exc:
        error = exc
    if dist is not None and distributed.any_rank(error is not None, dist) and error is None:
        raise UserError(f'--out {folder}: rank 0 could not lock the folder (see its message)')
    if error is not None:
        raise error
    return lock
