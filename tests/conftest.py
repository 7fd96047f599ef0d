"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from npvlm import fast_ops


@pytest.fixture
def restore_table():
    """Whatever a test registers, the fast-op seam's table is as it was afterwards (registration is process-wide)."""
    saved = {name: dict(table) for name, table in fast_ops._TABLE.items()}
    yield
    for name, table in fast_ops._TABLE.items():
        table.clear()
        table.update(saved.get(name, {}))
