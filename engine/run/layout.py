"""The names inside a run folder: ``<output_dir>/.spyke/<run_id>/{events.jsonl,control/,console.log}``.

The engine writes these and every viewer reads them, so they are spelled here once.
"""

from __future__ import annotations

RUNS_DIRNAME = ".spyke"          # under an output dir: one folder per run
EVENTS_FILENAME = "events.jsonl"  # the run's journal (engine.run.journal)
CONTROL_DIRNAME = "control"      # command files for the run (engine.run.channel)
CONSOLE_FILENAME = "console.log"  # stdout/stderr of a run with no terminal
