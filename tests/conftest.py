"""What every test module gets: ``tests/support/`` importable, and its asserts rewritten by pytest.

Two ways in, on purpose: test modules import helpers as ``tests.support.<module>``; the plugin modules
(``plugins_for_tests``, ``metrics_plugins``) are named by ``module:attr`` specs exactly as a user names theirs, as
top-level modules on the path (the server subprocesses get ``PYTHONPATH=tests/support``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "support"

pytest.register_assert_rewrite("tests.support")
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))
