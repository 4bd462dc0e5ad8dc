"""A training run's lifecycle: kohya ``train_network.py`` semantics for SD1.5 LoRA, UI-free.

One :class:`Trainer` runs one job: it validates and plans the config, checks the resume state
and the output folder, opens the run folder, loads the base model, hands the training to
``engine.train`` and reports how it ended. It reports through events (see ``engine.events``)
and obeys a :class:`~engine.control.TrainingControl` at step boundaries; it runs the
same whether a cockpit, a test or nothing is listening.
"""

from __future__ import annotations

import os
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from engine.run.channel import ControlChannel
from engine.checkpoint import cleanup_temp_files
from engine.config import TrainConfig
from engine.config_io import to_toml
from engine.control import TrainingControl
from engine.devices import enable_mps_fallback, pick_device
from engine.errors import ConfigError, ModelLoadError, SpykeError
from engine.events import Event, EventBus, LogMessage, PhaseChanged, RunFinished, RunStarted
from engine.run.journal import EventLog
from engine.output_guard import OutputCheck, apply_renames, check_outputs
from engine.plan import RunPlan, missing_model, plan_run
from engine.run.folder import RunFolder, new_run_id
from engine.state import cleanup_temp_dirs, config_mismatches, find_latest_state, load_state
from engine.train.job import Job
from engine.train.loop import memory_sample
from engine.train.progress import StepCounters


@dataclass
class RunResult:
    status: str                      # completed | aborted | failed
    global_step: int
    final_path: Path | None = None
    error: str | None = None
    run_dir: Path | None = None
    losses: list[float] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)


def quiet_libraries() -> None:
    """Keep diffusers/transformers progress bars and advice off the user's screen."""
    import logging
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # diffusers imports it; it logs a 4-bit kernel note
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|diffusers)\.")


class Trainer:
    """Train one LoRA. ``loss_hook(step, loss) -> loss`` lets tests inject faults (e.g. NaN, or raise an
    out-of-memory error). ``on_disk_full``: ``stop`` (headless: stop resumable) or ``pause`` (a UI is
    watching: pause until the user frees space and resumes; see ``engine.train.disk_guard``)."""

    def __init__(self, config: TrainConfig, *, control: TrainingControl | None = None,
                 sinks: Iterable[Callable[[Event], None]] = (), run_id: str | None = None,
                 loss_hook: Callable | None = None, on_disk_full: str = "stop") -> None:
        self.config = config
        self.control = control or TrainingControl()
        self.bus = EventBus(sinks)
        self.run_id = run_id or os.environ.get("SPYKE_RUN_ID") or new_run_id(config.output_name or "run")
        self.channel: ControlChannel | None = None
        self.loss_hook = loss_hook
        self.on_disk_full = on_disk_full
        self.run_dir: Path | None = None
        self.folder: RunFolder | None = None
        self.counters = StepCounters()
        self._log: EventLog | None = None

    # ------------------------------------------------------------------ public
    def run(self) -> RunResult:
        status, error, final_path, hint, fits = "failed", None, None, None, []
        try:
            final_path, status = self._run()
            if status == "aborted":
                hint = self._resume_hint()
        except SpykeError as err:
            error = str(err)
            hint = self._resume_hint()
            fits = list(getattr(err, "fits", ()))
            self._emit(LogMessage(level="error", message=error))
        except Exception as err:  # noqa: BLE001 - reported as one line; the trace goes to the run folder
            error = f"{type(err).__name__}: {err}".splitlines()[0]
            self._write_trace()
            self._emit(LogMessage(level="error", message=error))
            hint = self._resume_hint()
        self._emit(PhaseChanged(phase="finished", detail=status))
        c = self.counters
        self._emit(RunFinished(status=status, step=c.global_step, error=error,
                               final_path=str(final_path) if final_path else None, resume_hint=hint, fits=fits))
        if self._log is not None:
            self._log.close()
        return RunResult(status, c.global_step, final_path, error, self.run_dir, c.losses, c.saved)

    # ------------------------------------------------------------------ plumbing
    def _emit(self, event: Event) -> None:
        self.bus.emit(event)

    def _phase(self, phase: str, detail: str = "") -> None:
        self._emit(PhaseChanged(phase=phase, detail=detail))

    def _write_trace(self) -> None:
        if self.folder is not None:
            self.folder.write_trace(traceback.format_exc())

    def _resume_hint(self) -> str | None:
        return self.counters.resume_hint()

    def _prepare_output(self, plan: RunPlan, start_step: int | None) -> tuple[Path, OutputCheck]:
        """Check the output folder before anything is written; ``start_step``: the resumed state's step."""
        out = Path(self.config.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".spyke-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"--output_dir={out}: not writable ({err.strerror or err}); "
                              "choose a folder you can write to") from None
        for leftover in cleanup_temp_files(out) + cleanup_temp_dirs(out):
            self._emit(LogMessage(level="info", message=f"removed leftover temp {leftover.name}"))
        check = check_outputs(out, self.config, plan, self.run_id, start_step)
        if check.finished is None:
            apply_renames(check.renames, self.run_id)
        return out, check

    def _open_run_folder(self, out: Path) -> Path:
        folder = RunFolder(out, self.run_id)
        folder.create()
        folder.write_config(to_toml(self.config))
        run_dir = folder.path
        self._log = EventLog(folder.events_path)
        self.bus.add(self._log)
        self.folder, self.run_dir = folder, run_dir
        self.counters.resume_with = folder.resume_command
        self.channel = ControlChannel(run_dir, self.control, on_command=lambda command, sender: self._emit(
            LogMessage(level="info", message=f"control: {command.value}" + (f" from {sender}" if sender else ""))))
        return run_dir

    # ------------------------------------------------------------------ the job
    def _run(self) -> tuple[Path | None, str]:
        cfg = self.config.validate()
        from engine.network_weights import resolve_dim_from_weights

        cfg = resolve_dim_from_weights(cfg)  # kohya's --dim_from_weights: network_dim/alpha from the file
        enable_mps_fallback()
        plan = plan_run(cfg)
        if (missing := missing_model(cfg)) is not None:
            raise ModelLoadError(missing)
        loaded_state = None
        resume_warnings: list[str] = []
        if cfg.resume:
            state_path = (find_latest_state(Path(cfg.output_dir), cfg.output_name)
                          if cfg.resume == "latest" else Path(cfg.resume))
            if state_path is None:
                raise ConfigError(f"--resume latest: no '{cfg.output_name}-*-state' folder in {cfg.output_dir}; "
                                  "train with --save_state first, or pass a state folder")
            loaded_state = load_state(state_path)
            saved_cfg = loaded_state.progress.config
            if cfg.seed is None:
                cfg = cfg.replace(seed=loaded_state.progress.seed)
            mismatches = config_mismatches(saved_cfg, cfg.to_dict())
            if mismatches and not cfg.resume_force:
                raise ConfigError(f"--resume={state_path}: the run's settings changed ({'; '.join(mismatches)}); "
                                  "use the saved settings, or add --resume_force to continue anyway")
            if mismatches:
                resume_warnings.append(f"--resume_force: continuing {state_path} with changed settings "
                                       f"({'; '.join(mismatches)})")
            self.run_id = loaded_state.progress.run_id or self.run_id
        seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
        if seed != self.config.seed and any(ds.validation_split > 0 for ds in plan.dataset.datasets):
            plan = plan_run(cfg.replace(seed=seed))  # without validation_seed the run's seed picks the held-out images
        cfg = cfg.replace(seed=seed)
        self.config = cfg
        start_step = loaded_state.progress.global_step if loaded_state else None
        if plan.start is not None:   # --initial_step/--initial_epoch place the run, a resumed state's step aside
            if loaded_state is not None:
                resume_warnings.append(f"--resume={loaded_state.path}: the state's step ({start_step}) is ignored "
                                       "because --initial_step/--initial_epoch is given (kohya does the same)")
            start_step = plan.start.step if (loaded_state is not None or plan.start.step) else None
        out, outputs = self._prepare_output(plan, start_step)
        if outputs.finished is not None:  # nothing left to train: change nothing, not even the run folder
            self.counters.place(outputs.finished_step or 0)
            self._emit(LogMessage(level="warning", message=outputs.finished_message()))
            return outputs.finished, "completed"
        for src, dst in outputs.renames:
            if loaded_state is not None and src.resolve() == loaded_state.path.resolve():
                loaded_state.path = dst
        resume_warnings += outputs.notes
        run_dir = self._open_run_folder(out)

        device = pick_device(cfg.device)
        self._emit(RunStarted(
            run_id=self.run_id, output_dir=str(out), output_name=cfg.output_name, total_steps=plan.last_step,
            num_epochs=plan.num_epochs, batches_per_epoch=plan.batches_per_epoch, device=str(device),
            pid=os.getpid(), config=cfg.to_dict(), checkpoint_steps=[c.step for c in plan.checkpoints],
            start_step=start_step or 0, seed=seed))
        for warning in plan.warnings + resume_warnings:
            self._emit(LogMessage(level="warning", message=warning))
        self._phase("loading", cfg.pretrained_model_name_or_path)
        self._emit(memory_sample(device.type))
        started_at = time.time()

        from engine.models import load_base_model

        quiet_libraries()

        base = load_base_model(cfg.pretrained_model_name_or_path,
                               sd_config_dir=Path(cfg.sd_config_dir) if cfg.sd_config_dir else None,
                               allow_pickle=cfg.allow_pickle)
        from engine.plan import check_clip_skip

        check_clip_skip(cfg.clip_skip, base.text_encoder.config.num_hidden_layers)
        return Job(self, cfg, plan, base, device, loaded_state, seed, started_at, run_dir).train()
