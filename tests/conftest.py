"""Test settings. float64 is enabled only inside tests that ask for it
(``jax.experimental.enable_x64``), so the library is exercised in its default float32."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
