"""The process's descriptor table, grown once at start (the broker's and the ceiling's).

The kernel grows a process's descriptor table by doubling as descriptors are
opened, and in a process with several threads each growth waits for an RCU
grace period, inside the ``accept()`` that needed it: in a reconnect storm of
10,000 sensors the loop stood still there for about 5 % of the storm. The
table never shrinks, so growing it once, before serving, costs only its
memory (about 8 bytes a descriptor).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource


def presize_fd_table(descriptors: int) -> None:
    """Grow this process's descriptor table to hold ``descriptors`` now (at most the
    open-files limit allows), leaving nothing open: a duplicate at the highest
    number needed grows it, and ``F_DUPFD`` takes the lowest free number from
    there, so no descriptor in use is touched."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        descriptors = min(descriptors, soft)
    with contextlib.suppress(OSError):
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, descriptors - 1))
        finally:
            os.close(fd)
