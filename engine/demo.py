"""The embedded default job: the tiny offline model trained on a generated dataset."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from engine.config import TrainConfig
from engine.config_io import build_config

DEMO_PRESET = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"


def cache_root() -> Path:
    """Where built demo assets live (reused between runs): $SPYKE_CACHE or ~/.cache/spyke-cockpit."""
    env = os.environ.get("SPYKE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spyke-cockpit"


def prepare_demo(root: Path | None = None, output_root: Path | None = None, **overrides) -> TrainConfig:
    """Build (or reuse) the tiny model and dataset and return a valid config for them.

    Each call gets a fresh output folder ``<output_root>/<timestamp>`` (default
    ``./spyke-demo-output``), so a demo never overwrites an earlier demo's files.
    """
    from engine.tiny import build_tiny_model, generate_dataset

    root = Path(root) if root else cache_root()
    model = build_tiny_model(root / "tiny-sd15")
    dataset_root = root / "demo-dataset"
    if not (dataset_root / "dataset.toml").exists():
        generate_dataset(dataset_root, num_images=8, num_repeats=4)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    out = Path(output_root) if output_root else Path.cwd() / "spyke-demo-output"
    values = {
        "pretrained_model_name_or_path": str(model),
        "dataset_config": str(dataset_root / "dataset.toml"),
        "output_dir": str(out / stamp),
    }
    values.update(overrides)
    return build_config(DEMO_PRESET if DEMO_PRESET.exists() else None, values)
