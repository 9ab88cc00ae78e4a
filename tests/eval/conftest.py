"""Shared set-up of the evaluation tests."""

import pytest


@pytest.fixture
def isolated_cache(monkeypatch, tmp_path):
    """Offline, with the rrepa and torch caches in the test's own folder (nothing read from or left in ~/.cache)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RREPA_OFFLINE", "1")
    monkeypatch.setenv("RREPA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
