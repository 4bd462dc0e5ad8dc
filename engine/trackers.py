"""Experiment trackers as event sinks: a run's events become kohya's TensorBoard scalars and wandb logs.

The tags and steps are those of kohya's ``train_network.py`` (``generate_step_logs`` and the epoch and
validation logs), so dashboards built on kohya runs read these the same way:

- every step, at TensorBoard step ``global_step``: ``loss/current``, ``loss/average`` (kohya's
  ``LossRecorder.moving_average``: the mean of the last epoch's worth of step losses), and one
  ``lr/<group>`` per parameter group (``lr/textencoder``, ``lr/unet``, ``lr/unet_block<i>``, ``… plus``),
  plus the ``lr/group<i>`` copies kohya's loop also writes (its ``for … else`` runs after every loop), each
  the rate once the schedule stepped, as kohya reads ``get_last_lr()``; for DAdapt* and Prodigy also
  ``lr/d*lr/<group>`` and ``lr/d*lr/group<i>`` (the group's adapted ``d`` × lr); with ``--scale_weight_norms``,
  ``max_norm/keys_scaled``, ``max_norm/max_key_norm`` and ``norm/avg_key_norm`` (kohya v0.10's names);
- at the end of each epoch, at TensorBoard step ``epoch``: ``loss/epoch_average``;
- after a validation pass, at ``global_step``: ``loss/validation/step_average`` and ``…/step_divergence``;
  after an end-of-epoch pass, at TensorBoard step ``epoch``: ``loss/validation/epoch_average`` and
  ``…/epoch_divergence`` (a pass that is only the epoch's writes only those, as kohya's epoch validation).

wandb gets the same logs with ``global_step`` and ``epoch`` added (kohya's wandb form). With ``--log_config``
the run's settings (``engine.tracker_config.logged_config``) are TensorBoard hparams and the wandb config.
"""

from __future__ import annotations

import netrc
import os
import socket
from collections import deque
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from engine.events import Event, RunFinished, RunStarted, Sink, StepCompleted, ValidationLoss
from engine.tracker_config import (destinations, logged_config, run_log_dir, tensorboard_options, tracker_name,
                                   wandb_init_options)

Record = tuple[dict[str, float], int, int, int]   # logs, TensorBoard step, global step, epoch
TEXT_ENCODER_GROUP = "text_encoder"                # the engine's group name; kohya says "textencoder"


def d_lr_kind(optimizer_type: str) -> str:
    """Which ``lr/d*lr`` tags kohya writes for ``--optimizer_type``: ``dadapt`` (a DAdapt* name or Prodigy),
    ``prodigyplus`` (a name ending in ProdigyPlusScheduleFree), or ``""`` (none); kohya matches the flag's text."""
    lower = (optimizer_type or "").lower()
    if lower.startswith("dadapt") or lower == "prodigy":
        return "dadapt"
    return "prodigyplus" if lower.endswith("prodigyplusschedulefree") else ""


def kohya_name(group: str) -> str:
    return group.replace(TEXT_ENCODER_GROUP, "textencoder")


def kohya_lr_logs(lrs: dict[str, float], unet_only: bool, *, described: bool = True,
                  d_lrs: dict[str, float] | None = None, d_kind: str = "") -> dict[str, float]:
    """kohya's ``lr/…`` scalars (``generate_step_logs``) for the engine's parameter groups, text encoder
    first as kohya orders them. ``described``: the network names its groups (networks.lora, LyCORIS; not
    networks.dylora, whose groups kohya names unet / group<i+1>); ``d_lrs``: each group's d × lr, logged as
    ``lr/d*lr/…`` when ``d_kind`` (see :func:`d_lr_kind`) says kohya does."""
    def first_text_encoder(item: tuple[str, float]) -> bool:
        return not item[0].startswith(TEXT_ENCODER_GROUP)

    ordered = sorted(lrs.items(), key=first_text_encoder)
    dlr = [None] * len(ordered) if d_lrs is None else [d_lrs.get(name) for name, _ in ordered]
    logs: dict[str, float] = {}
    for i, (name, lr) in enumerate(ordered):
        if described:
            desc = kohya_name(name)
        else:   # kohya: idx = i - (0 if unet_only else -1), so the text encoder is never named here
            desc = "unet" if len(ordered) <= 2 else f"group{i if unet_only else i + 1}"
        logs[f"lr/{desc}"] = float(lr)
        if d_kind == "dadapt" and dlr[i] is not None:
            logs[f"lr/d*lr/{desc}"] = float(dlr[i])
        if d_kind == "prodigyplus" and dlr[0] is not None:
            logs["lr/d*lr"] = float(dlr[0])
    # kohya's `for … else` also runs, after every loop: lr/textencoder is the first group's rate (whichever it
    # is) unless --network_train_unet_only, and every later group is lr/group<i> (with its d*lr)
    first = 0
    if not unet_only and ordered:
        logs["lr/textencoder"] = float(ordered[0][1])
        first = 1
    for i in range(first, len(ordered)):
        logs[f"lr/group{i}"] = float(ordered[i][1])
        if d_kind and dlr[i] is not None:
            logs[f"lr/d*lr/group{i}"] = float(dlr[i])
    return logs


def max_norm_logs(event: StepCompleted) -> dict[str, float]:
    """kohya's ``--scale_weight_norms`` scalars of a step (none without it)."""
    logs: dict[str, float] = {}
    if event.keys_scaled is not None:
        logs["max_norm/keys_scaled"] = event.keys_scaled
        logs["max_norm/max_key_norm"] = event.max_key_norm
    if event.avg_key_norm is not None:
        logs["norm/avg_key_norm"] = event.avg_key_norm
    return logs


class KohyaScalars:
    """Turns one run's events into kohya's log records (tags, TensorBoard step, global step, epoch)."""

    def __init__(self) -> None:
        self.steps_per_epoch = 1
        self.total_steps = 0
        self.unet_only = False
        self.described = True
        self.d_kind = ""
        self.recent: deque[float] = deque()
        self.validated_step: int | None = None

    def start(self, event: RunStarted) -> None:
        accumulation = max(1, int(event.config.get("gradient_accumulation_steps") or 1))
        self.steps_per_epoch = max(1, -(-event.batches_per_epoch // accumulation))
        self.total_steps = event.total_steps
        self.unet_only = bool(event.config.get("network_train_unet_only"))
        self.described = event.config.get("network_module") != "networks.dylora"
        self.d_kind = d_lr_kind(str(event.config.get("optimizer_type") or ""))
        self.recent = deque(maxlen=self.steps_per_epoch)

    @property
    def moving_average(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def records(self, event: Event) -> list[Record]:
        if isinstance(event, StepCompleted):
            if not event.skipped:
                self.recent.append(event.loss)
            logs = {"loss/current": event.loss, "loss/average": self.moving_average, **max_norm_logs(event),
                    **kohya_lr_logs(event.lrs if event.next_lrs is None else event.next_lrs, self.unet_only,
                                    described=self.described, d_lrs=event.d_lrs, d_kind=self.d_kind)}
            out = [(logs, event.step, event.step, event.epoch)]
            if event.step % self.steps_per_epoch == 0 or event.step == self.total_steps:
                out.append(({"loss/epoch_average": self.moving_average}, event.epoch, event.step, event.epoch))
            return out
        if isinstance(event, ValidationLoss):
            out = []
            if event.step != self.validated_step and event.kinds != ["epoch"]:
                logs = {"loss/validation/step_average": event.loss,
                        "loss/validation/step_divergence": event.loss - self.moving_average}
                out.append((logs, event.step, event.step, event.epoch))
            if "epoch" in event.kinds:     # kohya's end-of-epoch validation: at TensorBoard step epoch
                logs = {"loss/validation/epoch_average": event.loss,
                        "loss/validation/epoch_divergence": event.loss - self.moving_average}
                out.append((logs, event.epoch, event.step, event.epoch))
            self.validated_step = event.step     # the same pass named for another file of this step: once
            return out
        return []


class TensorBoardTracker:
    """Writes ``<logging_dir>/<prefix><timestamp>/<name>/events.out.tfevents.*`` for each run start.

    The timestamp is the run's start (local time, kohya's format); scalars carry the events' wall times,
    so exporting a finished run writes what live logging wrote."""

    def __init__(self, logging_dir: str | Path, prefix: str, name: str, options: dict[str, Any] | None = None) -> None:
        self.logging_dir, self.prefix, self.name = Path(logging_dir), prefix, name
        self.options = dict(options or {})
        self.scalars = KohyaScalars()
        self.writer = None
        self.folders: list[Path] = []
        self.written = 0

    def __repr__(self) -> str:
        return f"TensorBoard logging to {self.logging_dir}"

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.close()
            self._open(event)
            return
        if self.writer is None:
            return
        records = self.scalars.records(event)
        for logs, tb_step, _step, _epoch in records:
            for tag, value in logs.items():
                self.writer.add_scalar(tag, value, tb_step, walltime=event.t)
                self.written += 1
        if records:
            self.writer.flush()
        if isinstance(event, RunFinished):
            self.close()

    def folder_for(self, event: RunStarted) -> Path:
        return run_log_dir(self.logging_dir, self.prefix, event.t) / self.name

    def _open(self, event: RunStarted) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.folder_for(event)
        self.scalars.start(event)
        self.writer = SummaryWriter(str(folder), **self.options)
        self.folders.append(folder)
        if (values := logged_config(event.config)) is not None:
            self._store_config(values, f"{event.t:.6f}")

    def _store_config(self, values: dict[str, Any], run_name: str) -> None:
        """accelerate's TensorBoard ``store_init_configuration`` (kohya's ``--log_config``): the values as
        hparams in a ``<run_name>/`` subfolder of the tracker's folder, and as ``hparams.yml`` beside them."""
        import yaml

        self.writer.add_hparams(values, metric_dict={}, run_name=run_name)
        self.writer.flush()
        folder = Path(self.writer.log_dir) / run_name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hparams.yml").write_text(yaml.safe_dump(values), encoding="utf-8")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def wandb_offline_reason(api_key: str) -> str | None:
    """Why wandb cannot log online from here (None: it can)."""
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    if not reachable(host):
        return f"no network ({host} unreachable)"
    if api_key or os.environ.get("WANDB_API_KEY"):
        return None
    try:
        if netrc.netrc().authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "not logged in (no --wandb_api_key, WANDB_API_KEY or `wandb login`)"


class WandbTracker:
    """A wandb run per run start: project = the tracker name, offline when wandb cannot log online."""

    def __init__(self, logging_dir: str, prefix: str, name: str, options: dict[str, Any], api_key: str,
                 say: Callable[[str], None]) -> None:
        self.logging_dir, self.prefix, self.name = logging_dir, prefix, name
        self.options, self.api_key, self.say = options, api_key, say
        self.scalars = KohyaScalars()
        self.run = None

    def __repr__(self) -> str:
        return f"wandb logging to project {self.name}"

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.finish(0)
            self._init(event)
            return
        if self.run is None:
            return
        for logs, _tb_step, step, epoch in self.scalars.records(event):
            self.run.log({**logs, "global_step": step, "epoch": epoch})
        if isinstance(event, RunFinished):
            self.finish(0 if event.status == "completed" else 1)

    def _init(self, event: RunStarted) -> None:
        import wandb

        options = dict(self.options)
        if self.logging_dir:  # kohya points WANDB_DIR at the launch's log folder
            folder = run_log_dir(self.logging_dir, self.prefix, event.t)
            folder.mkdir(parents=True, exist_ok=True)
            options.setdefault("dir", str(folder))
        reason = None
        if not options.get("mode") and not os.environ.get("WANDB_MODE"):
            reason = wandb_offline_reason(self.api_key)
            options["mode"] = "offline" if reason else "online"
        if options.get("mode") == "online" and self.api_key:
            wandb.login(key=self.api_key)
        self.scalars.start(event)
        self.run = wandb.init(project=self.name, **options)
        if (values := logged_config(event.config)) is not None:   # kohya's --log_config: the wandb config
            self.run.config.update(values, allow_val_change=True)
        for metric in ("epoch", "val_step", "global_step"):
            self.run.define_metric(metric, hidden=True)
        if reason:
            where = self.run.settings.sync_dir
            self.say(f"wandb: {reason}: logging offline to {where}; upload it later with `wandb sync {where}`")

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def make_trackers(config: Any, say: Callable[[str], None] | None = None) -> list[Sink]:
    """The tracker sinks a run of ``config`` (a TrainConfig) logs to; none for an invalid config (the
    run itself refuses that, in one line). ``say`` gets the trackers' info lines."""
    if config.problems():
        return []
    chosen = destinations(config.log_with, config.logging_dir)
    values = config.to_dict()
    sinks: list[Sink] = []
    if "tensorboard" in chosen:
        sinks.append(TensorBoardTracker(config.logging_dir, config.log_prefix, tracker_name(config.log_tracker_name),
                                        tensorboard_options(values)))
    if "wandb" in chosen:
        sinks.append(WandbTracker(config.logging_dir, config.log_prefix, tracker_name(config.log_tracker_name),
                                  wandb_init_options(values), config.wandb_api_key, say or (lambda _line: None)))
    return sinks


def without_secrets(config: Any) -> Any:
    """The config the run records (config.toml, the journal): the wandb API key left out."""
    return config.replace(wandb_api_key="") if config.wandb_api_key else config
