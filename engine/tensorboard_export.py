"""``spyke-cockpit export-tensorboard RUN``: TensorBoard event files for a run logged without them.

The run's journal is replayed through the same sink live logging uses, so the files hold the same
tags, steps, values and wall times as a run made with ``--logging_dir``.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import SpykeError
from engine.events import RunStarted
from engine.run.journal import read_events
from engine.run.layout import EVENTS_FILENAME
from engine.run.registry import resolve_run
from engine.tracker_config import tensorboard_options, tracker_name
from engine.trackers import TensorBoardTracker

DEFAULT_SUBDIR = "logs"   # beside the checkpoints when neither the run nor the command names a folder


def export_tensorboard(run: str, logging_dir: str | None = None) -> list[str]:
    """Write the run's scalars; one line per run start (a resumed run has several), for the user."""
    run_dir = resolve_run(run)
    events = read_events(run_dir / EVENTS_FILENAME)
    starts = [e for e in events if isinstance(e, RunStarted)]
    if not starts:
        raise SpykeError(f"{run_dir}: the journal has no run start, so there is nothing to export")
    config = starts[0].config
    target = logging_dir or config.get("logging_dir") or str(run_dir.parent.parent / DEFAULT_SUBDIR)
    tracker = TensorBoardTracker(target, config.get("log_prefix", ""), tracker_name(config.get("log_tracker_name")),
                                 _options(config))
    for start in starts:  # refuse before writing anything: a second copy would double every curve
        folder = tracker.folder_for(start)
        if folder.is_dir() and any(folder.glob("events.out.tfevents.*")):
            raise SpykeError(f"{folder}: already holds TensorBoard events for this run; "
                             "pass --logging_dir=OTHER_DIR to write a fresh copy")
    for event in events:
        tracker(event)
    tracker.close()
    lines = [f"wrote TensorBoard events to {folder}" for folder in tracker.folders]
    lines.append(f"{tracker.written} scalars from {run_dir / EVENTS_FILENAME}; view them with "
                 f"`tensorboard --logdir {Path(target)}`")
    return lines


def _options(config: dict) -> dict:
    try:
        return tensorboard_options(config)
    except SpykeError:  # the run's tracker config file is gone or changed: export with the defaults
        return {}
