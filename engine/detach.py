"""``spyke-cockpit train --detach``: a headless run in its own session, in the background.

Everything a foreground run would refuse before it trains is checked here first, without
writing anything, so a bad config is one line on the terminal and a non-zero exit, never a
"started" message followed by an error nobody sees in ``console.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.config import TrainConfig
from engine.config_io import to_toml
from engine.errors import ConfigError, ModelLoadError
from engine.output_guard import OutputCheck, check_outputs
from engine.plan import RunPlan, missing_model, plan_run
from engine.run.layout import RUNS_DIRNAME
from engine.state import PROGRESS, config_mismatches, find_latest_state
from engine.run.folder import RunFolder, new_run_id


def preflight(config: TrainConfig) -> tuple[str | None, OutputCheck]:
    """Raise the one-line error a foreground run would stop on before training (config, dataset,
    base model, resume state, output folder); return the run id of the state being resumed (if any)
    and what the run would do to the output folder's files (the trainer's own rules, nothing applied)."""
    config.validate()
    if config.dim_from_weights:   # as the trainer: the rank and alpha come from the file (torch reads it)
        from engine.network_weights import resolve_dim_from_weights

        config = resolve_dim_from_weights(config)
    plan = plan_run(config)
    if (missing := missing_model(config)) is not None:
        raise ModelLoadError(missing)
    run_id, start_step = _check_resume(config) if config.resume else (None, None)
    return run_id, _check_output(config, plan, run_id, start_step)


def _check_resume(cfg: TrainConfig) -> tuple[str | None, int | None]:
    """The resume state exists, is one, and matches the config (as the trainer checks it; no torch)."""
    state = find_latest_state(Path(cfg.output_dir), cfg.output_name) if cfg.resume == "latest" else Path(cfg.resume)
    if state is None:
        raise ConfigError(f"--resume latest: no '{cfg.output_name}-*-state' folder in {cfg.output_dir}; "
                          "train with --save_state first, or pass a state folder")
    if not (state / PROGRESS).is_file():
        raise ConfigError(f"--resume={state}: not a spyke-cockpit state folder (no {PROGRESS}); "
                          "pass a '*-state' folder written with --save_state, or 'latest'")
    try:
        progress = json.loads((state / PROGRESS).read_text(encoding="utf-8"))
        saved, seed, run_id = progress["config"], progress["seed"], progress.get("run_id")
        step = int(progress["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--resume={state}: the state folder is damaged ({type(err).__name__}: {err}); "
                          "resume from an earlier '*-state' folder") from None
    current = cfg.replace(seed=seed) if cfg.seed is None else cfg
    mismatches = config_mismatches(saved, current.to_dict())
    if mismatches and not cfg.resume_force:
        raise ConfigError(f"--resume={state}: the run's settings changed ({'; '.join(mismatches)}); "
                          "use the saved settings, or add --resume_force to continue anyway")
    return run_id or None, step


def _check_output(cfg: TrainConfig, plan: RunPlan, run_id: str | None, start_step: int | None) -> OutputCheck:
    """The output folder can be created and written, and the run would replace only its own files."""
    out = Path(cfg.output_dir)
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "Not a directory" if not probe.is_dir() else "Permission denied"
        raise ConfigError(f"--output_dir={out}: not writable ({why}); choose a folder you can write to")
    if not out.is_dir():
        return OutputCheck()
    return check_outputs(out, cfg, plan, run_id or "", start_step)


def detach_run(config: TrainConfig, config_path: str | None = None) -> int:
    """Start the run as a new session (immune to the terminal's SIGHUP), output in the run folder."""
    resumed, outputs = preflight(config)
    if outputs.finished is not None:      # as in the foreground: nothing to train, nothing changed
        print(outputs.finished_message())
        return 0
    run_id = resumed or new_run_id(config.output_name)
    folder = RunFolder(config.output_dir, run_id)
    run_dir = folder.path
    created = False
    try:
        created = folder.create()
        launch = folder.write_launch(to_toml(config))
        env = dict(os.environ, SPYKE_RUN_ID=run_id, PYTHONUNBUFFERED="1")
        with open(folder.console_log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cockpit.cli", "train", "--headless", str(launch)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                cwd=os.getcwd())
    except OSError as err:
        if created:
            folder.remove()
        raise ConfigError(f"--output_dir={config.output_dir}: cannot start the run there "
                          f"({err.strerror or err}); choose a folder you can write to") from None
    print(f"started run {run_id} (pid {proc.pid}) in the background")
    print(f"  output:  {folder.console_log}")
    print(f"  watch:   spyke-cockpit attach {run_dir}")
    print(f"  list:    spyke-cockpit ls {config.output_dir}")
    return 0
