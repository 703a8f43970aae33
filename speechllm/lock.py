"""One writer per experiment dir: an advisory ``flock(2)`` lock on ``<dir>/.lock``.

Two trainings into one experiment dir would interleave their logs and checkpoints and end with a
model that neither run trained. The lock file names its holder (process id, host, start time and
command), so the second run is refused with a message saying who holds the dir. The kernel drops
the lock when the holder exits, however it exits: a killed run never leaves a stale lock. On a file
system without ``flock`` support the run goes on unlocked, with a warning. ``sf.sh`` tests the same
lock with ``flock(1)`` before it moves an earlier ``train.log`` aside.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from speechllm.io_utils import InputError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(directory: Path, what: str = "training", wait: bool = False) -> Iterator[None]:
    """Hold ``directory``'s lock for the block. If it is taken, raise :class:`InputError` naming the holder,
    or with ``wait`` (for work that the holder does for both, such as an alignment) wait for it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            if not wait:
                raise InputError(f"{directory} is in use by {holder}: wait for it to finish, stop it, or "
                                 f"run this {what} into another experiment dir (--tag)") from None
            log.info("%s is in use by %s: waiting for its %s", directory, holder, what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. a network file system mounted without flock support
            log.warning("%s cannot be locked (%s): a second %s into it would not be refused", path, e, what)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')} "
                       f"({' '.join(sys.argv)})\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
