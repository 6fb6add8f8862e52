"""Shared fixtures. ``clean_debias`` is opt-in (``pytestmark = pytest.mark.usefixtures("clean_debias")``)."""
import pytest


@pytest.fixture
def clean_debias(monkeypatch):
    """debias_core with no DEBIAS* environment, default settings and an empty table cache."""
    import os

    import debias_core

    for name in list(os.environ):
        if name.startswith("DEBIAS"):
            monkeypatch.delenv(name)
    debias_core.reset()
    debias_core.clear_cache()
    yield debias_core
    debias_core.reset()
    debias_core.clear_cache()
