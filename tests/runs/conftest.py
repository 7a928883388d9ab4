"""The runs tests' shared fixture (tests/runs/shared.py)."""

from tests.runs.shared import base  # noqa: F401 - a fixture
