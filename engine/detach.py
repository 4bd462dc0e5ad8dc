"""``spyke-cockpit train --detach``: a headless run in its own session, in the background."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.config import TrainConfig, to_toml
from engine.run.layout import RUNS_DIRNAME
from engine.trainer import new_run_id


def detach_run(config: TrainConfig, config_path: str | None = None) -> int:
    """Start the run as a new session (immune to the terminal's SIGHUP), output in the run folder."""
    config.validate()
    run_id = new_run_id(config.output_name)
    run_dir = Path(config.output_dir) / RUNS_DIRNAME / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    launch = run_dir / "launch.toml"
    launch.write_text(to_toml(config))
    log = open(run_dir / "console.log", "ab")
    env = dict(os.environ, SPYKE_RUN_ID=run_id, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cockpit.cli", "train", "--headless", str(launch)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        cwd=os.getcwd())
    log.close()
    print(f"started run {run_id} (pid {proc.pid}) in the background")
    print(f"  output:  {run_dir / 'console.log'}")
    print(f"  watch:   spyke-cockpit attach {run_dir}")
    print(f"  list:    spyke-cockpit ls {config.output_dir}")
    return 0
