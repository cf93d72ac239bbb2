"""A test-only fault hook: make the executor's next forward raise, on purpose and on cue.

With `TESSERA_FAULT_FILE=PATH` in the engine's environment, the executor (actors/executor.py)
looks for PATH before each forward; when it is there, the file is removed and the forward raises
`InjectedFault`, which fails that step's requests (a 500 each) while the engine carries on. While
PATH.slow exists, every forward first sleeps the seconds written in it (a slow engine, so a test
can act while requests are still generating). Unset (always, outside tests), the check is one
attribute test per step.
"""

from __future__ import annotations

import os
import time

ENV = "TESSERA_FAULT_FILE"


class InjectedFault(RuntimeError):
    """The forward failure a test asked for."""


class FaultHook:
    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get(ENV) or None

    def check(self) -> None:
        """Raise InjectedFault once per creation of the cue file; sleep while PATH.slow exists."""
        if self.path is None:
            return
        try:
            with open(self.path + ".slow") as f:
                time.sleep(float(f.read() or 0))
        except (FileNotFoundError, ValueError):
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        raise InjectedFault(f"fault injected through {ENV}")
