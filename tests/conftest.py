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
