"""Process checks shared by the store (lease owners) and the local provider (runner processes)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (PID 1 in a container may never reap orphans).

    Without /proc (macOS) a process that answers ``kill(pid, 0)`` counts as alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # /proc exists but the pid just went away
    except OSError:
        return True
    return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")
