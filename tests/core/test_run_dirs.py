"""Run folders: a killed launcher's folder is removed by the next start, a live one's kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.run_dirs import PID_FILE, remove_stale_run_dirs, stale


def test_only_folders_of_dead_launchers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    gone = tmp_path / "tessera-gone"
    live = tmp_path / "tessera-live"
    users = tmp_path / "tessera-users"  # no pid file: never touched
    other = tmp_path / "other-gone"
    for d in (gone, live, users, other):
        d.mkdir()
        (d / "front.sock").write_text("")
    (gone / PID_FILE).write_text(dead.stdout.strip())
    (other / PID_FILE).write_text(dead.stdout.strip())
    (live / PID_FILE).write_text(str(os.getpid()))
    assert stale(str(gone)) and not stale(str(live)) and not stale(str(users))
    assert remove_stale_run_dirs(str(tmp_path)) == [str(gone)]
    assert not gone.exists() and live.exists() and users.exists() and other.exists()
