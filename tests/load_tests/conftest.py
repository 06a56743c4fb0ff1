"""The benchmark scripts import their sibling modules as top-level ones (they run as scripts)."""

from __future__ import annotations

import sys
from pathlib import Path

LOAD_TESTS_DIR = Path(__file__).resolve().parents[2] / "load_tests"
if str(LOAD_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(LOAD_TESTS_DIR))
