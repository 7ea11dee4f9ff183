"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton (the mode is fixed when a
@triton.jit decorator runs), so it is set here, at the top of the first file pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
