"""One training run per run directory: an exclusive lock on ``out_dir/.lock``.

Two trainings given the same ``--out-dir`` would replace each other's checkpoint and metrics
(or crash mid-save). ``RunDirLock`` makes the second one refuse at start, with one line naming
the holder. The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``out_dir/.lock``, a file that records
the holder (pid, host, start time) so the refusal can name it, and is removed on release.

Stale locks: the kernel drops a flock when its process ends, however it ends, so a lock file
left by a SIGKILLed run is never *held*: the next run on this host takes it over with a note
naming the dead holder. A file left by a process on another host is refused instead (a flock
may not reach across machines on every shared filesystem, so that process may still be
running): the message says to delete the file if that run is gone.

The file is ``.lock``, not the sweep runner's ``run.lock`` (``modlm.experiments.sweep`` holds
that one while it calls ``train`` on the same folder), and only rank 0 of a DDP run takes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"

__all__ = ["LOCK_FILE", "RunDirLock", "RunDirLockedError", "make_run_dir"]


class RunDirLockedError(ValueError):
    """The run directory is held by another training run (the message names it, on one line)."""


def make_run_dir(path: str | os.PathLike, what: str = "TrainConfig.out_dir") -> Path:
    """Create the run directory ``path`` (and its parents) or raise a one-line ValueError that
    names it: a file where the directory should be, a parent that is a file, no permission."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what}={str(path)!r} is invalid: it is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parent = next((q for q in p.parents if q.exists() and not q.is_dir()), p.parent)
        raise ValueError(f"{what}={str(path)!r} is invalid: {parent} is a file, not a directory") from None
    except OSError as e:
        raise ValueError(f"{what}={str(path)!r} is invalid: cannot create it ({e.strerror})") from None
    return p


def _read_holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not written its name yet"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{since}"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunDirLock:
    """The exclusive hold of one run directory, as a context manager (or ``acquire``/``release``).

    Args:
        out_dir: the run directory (created if missing; a one-line ValueError naming it when it
            cannot be: see ``make_run_dir``).
        say: where the note about a taken-over stale lock goes (default ``print``).
    Raises (from ``acquire``):
        RunDirLockedError: another live run holds it (the message names its pid and host).
        ValueError: the directory cannot be created or written.
    """

    def __init__(self, out_dir: str | os.PathLike, say: Callable[[str], None] = print):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.say = say
        self.fd: int | None = None

    def acquire(self) -> RunDirLock:
        make_run_dir(self.out_dir)
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ValueError(
                    f"TrainConfig.out_dir={str(self.out_dir)!r} is invalid: cannot write {self.path} ({e.strerror})"
                ) from None
            if not self._lock(fd):
                continue
            self._take_over(fd)
            self.fd = fd
        return self

    def _lock(self, fd: int) -> bool:
        """flock ``fd``; False when the file was replaced meanwhile (retry), raises when held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLockedError(
                f"{self.out_dir} is in use by another training run ({_describe(holder)}); "
                "wait for it to end or pick another --out-dir"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            self.say(f"note: {self.out_dir}'s filesystem cannot lock files ({e.strerror}); running without a lock")
        # A releasing holder unlinks the file: a lock on that unlinked inode guards nothing.
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
        return same

    def _take_over(self, fd: int) -> None:
        """Note a stale holder (one from this host that is gone), refuse one from another host,
        then write this process as the holder."""
        holder, host = _read_holder(fd), socket.gethostname()
        if holder and holder.get("pid") != os.getpid():
            if holder.get("host") != host:
                os.close(fd)
                raise RunDirLockedError(
                    f"{self.out_dir} is locked by {_describe(holder)} (another machine, so this one cannot tell "
                    f"whether it still runs); if that run is gone, delete {self.path}"
                )
            state = "still running but not holding the lock" if _pid_alive(holder["pid"]) else "no longer running"
            self.say(f"note: taking over the stale lock {self.path} of pid {holder['pid']} ({state})")
        me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first: see ``_lock``)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
