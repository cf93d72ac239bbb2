"""Suite-wide settings. Compiling the vision tower's elementwise steps costs seconds per model
load; the suite runs them eagerly, and tests/models/test_vision_kernels.py checks the compiled
steps against the eager ones and transformers'. Servers the tests start inherit this."""

from __future__ import annotations

import os

os.environ.setdefault("TESSERA_COMPILE", "0")
