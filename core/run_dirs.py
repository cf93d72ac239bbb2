"""Run folders: the private (0700) folder of an engine's ipc:// sockets, spec file and metrics.

A launcher that makes its own folder (no `--run-dir`) writes its pid there and removes the folder
when it stops. One that was killed (SIGKILL, OOM) cannot: the next launcher removes such stale
folders — only those whose launcher pid no longer runs — before it makes its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile

PREFIX = "tessera-"
PID_FILE = "launcher.pid"


def make_run_dir() -> str:
    """A new private folder under the temp dir, holding this process's pid."""
    remove_stale_run_dirs()
    path = tempfile.mkdtemp(prefix=PREFIX)
    with open(os.path.join(path, PID_FILE), "w") as f:
        f.write(str(os.getpid()))
    return path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale(path: str) -> bool:
    """True for a run folder whose launcher is gone; a folder without a readable pid file (a
    user's, or another program's) is never stale."""
    try:
        with open(os.path.join(path, PID_FILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return False
    return pid > 0 and not _running(pid)


def remove_stale_run_dirs(parent: str | None = None) -> list[str]:
    """Remove this user's stale run folders under `parent` (the temp dir); returns them."""
    parent = parent or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(PREFIX) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
