"""Shared test setup: the repo root is importable, and every test starts from config.py's defaults."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import config  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_config():
    """Undo whatever a test (or configure()) did to the settings."""
    yield
    importlib.reload(config)
