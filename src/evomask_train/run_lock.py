"""One run per output folder: a lock file naming the run that holds the folder.

Two trainers writing one folder would append to one ``metrics.csv``, prune each other's
checkpoints and delete each other's checkpoint writes in flight. The holder keeps an exclusive
``flock`` on ``evomask.lock`` for its whole life, so the kernel releases it however the process
ends; the file also records the holder's pid, host and start time, so the run that is refused can
name it, and a lock left behind by a run killed on this host is recognised as stale.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: only the pid check guards the folder
    fcntl = None

__all__ = ["LOCK_NAME", "FolderBusy", "RunLock"]

LOCK_NAME = "evomask.lock"


class FolderBusy(RuntimeError):
    """The folder is held by another run, named in the message."""


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), None where unknown.

    With the pid it identifies a process: a pid reused by a later process has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after it do not.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    except OSError:
        return False
    now = _process_start(pid)
    return started is None or now is None or now == started


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another run (its lock file is still being written)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"


class RunLock:
    """Holds ``folder`` for this process until :meth:`release` (or the process ends).

    Use as a context manager or call :meth:`acquire` / :meth:`release`. :meth:`acquire` raises
    :class:`FolderBusy` naming the holder (pid, host, since when) when another live run holds the
    folder, or when the holder ran on another host, whose processes this one cannot see.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        #: A one-line note when :meth:`acquire` took over a stale lock, else None.
        self.took_over: str | None = None

    def acquire(self) -> "RunLock":
        """Takes the folder; raises :class:`FolderBusy` when another run holds it."""
        for _ in range(100):  # retried only when the holder released the lock mid-way
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                if self._take(fd):
                    self._fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise FolderBusy(f"could not take {self.path}: it is released and recreated continually")

    def _take(self, fd: int) -> bool:
        kernel_lock = _flock(fd)
        if kernel_lock is False:
            raise FolderBusy(self._busy(_read(fd)))
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                return False  # the holder unlinked this file as we opened it: take the new one
        except FileNotFoundError:
            return False
        previous = _read(fd)
        host = socket.gethostname()
        if previous:
            if previous.get("host") != host:
                raise FolderBusy(self._busy(previous, other_host=True))
            pid = previous.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid, previous.get("pid_started")):
                raise FolderBusy(self._busy(previous))
            self.took_over = f"taking over {self.path} from {_describe(previous)}, which is no longer running"
        me = {"pid": os.getpid(), "host": host, "pid_started": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        return True

    def _busy(self, holder: dict | None, other_host: bool = False) -> str:
        text = f"{self.path.parent} is in use by {_describe(holder)} (lock file {self.path})"
        if other_host:
            return (f"{text}; that host's processes cannot be checked from here: if that run has ended, "
                    f"delete {self.path}, else use another --output-dir")
        pid = holder.get("pid") if holder else None
        if holder and holder.get("host") == socket.gethostname() and isinstance(pid, int) \
                and not _pid_alive(pid, holder.get("pid_started")):
            # The lock belongs to the open file, which the run's forked workers share until they exit.
            return f"{text}; that pid has ended but processes it started still hold the lock: retry once they exit"
        return f"{text}; wait for it to end or use another --output-dir"

    def release(self) -> None:
        """Gives the folder up (removes the lock file); a no-op when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # after the unlink: a waiting run then finds no file, or its own

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: no kernel lock on this filesystem."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _read(fd: int) -> dict | None:
    data = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None
