"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny SD1.5-shaped model and demo dataset for the session, in engine.demo's cache layout
    (``<root>/tiny-sd15``, ``<root>/demo-dataset``): pass it as ``SPYKE_CACHE`` or ``prepare_demo(root=...)``."""
    from engine.demo import prepare_demo

    root = tmp_path_factory.getbasetemp() / "spyke-tiny-shared"
    prepare_demo(root=root, output_root=root / "unused")
    return root


@pytest.fixture(autouse=True)
def _no_user_runs_root(tmp_path_factory, monkeypatch):
    """Tests never read the developer's own ~/.config/spyke-cockpit or $SPYKE_RUNS_ROOT."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
    monkeypatch.delenv("SPYKE_RUNS_ROOT", raising=False)
