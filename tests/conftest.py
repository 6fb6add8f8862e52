"""Shared fixtures. ``clean_debias`` is opt-in (``pytestmark = pytest.mark.usefixtures("clean_debias")``)."""
import pytest

# Shared checks in helper modules report failures as a test's own asserts do (pytest rewrites only test modules
# and conftest files unless told); registered before any test module imports them.
pytest.register_assert_rewrite("tests.support", "tests.baselines.eval_support")


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
