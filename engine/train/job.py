"""One run's training job: the parts of ``engine.train`` assembled over the loaded base model.

``trainer`` supplies the run's context once (its id, event emitter, step counters, control,
control channel and loss hook); nothing here calls back into it.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import TrainConfig
from engine.events import AttentionKernel, LogMessage, NetworkBuilt
from engine.kohya.metadata import run_metadata
from engine.optimizers import ensure_train_mode
from engine.state import capture_rng, restore_rng
from engine.train.loop import Loop
from engine.train.disk_guard import DiskGuard
from engine.train.nan_policy import NanPolicy
from engine.train.oom import OomGuard, is_oom, summary
from engine.train.saver import Saver
from engine.train.sampling import Sampler
from engine.train.setup import build_optimizer, param_groups, setup_models
from engine.train.step import TrainStep


class Job:
    """The loaded models and optimizer of one run, and the step loop over them."""

    def __init__(self, trainer, cfg: TrainConfig, plan, base, device, loaded_state, seed: int,
                 started_at: float, run_dir: Path) -> None:
        self.emit = trainer.bus.emit
        self.counters = trainer.counters
        self.run_id = trainer.run_id
        self.control, self.channel, self.loss_hook = trainer.control, trainer.channel, trainer.loss_hook
        self._cfg = cfg
        self.plan, self.base, self.seed, self.started_at, self.run_dir = plan, base, seed, started_at, run_dir
        self.device_type = device.type

        m = self.models = setup_models(cfg, base, device, seed)
        net = self.network = m.network
        self.emit(NetworkBuilt.of(len(net.unet_module_names), len(net.text_encoder_module_names), net.dim, net.alpha))
        if m.attention is not None:
            self.emit(AttentionKernel.of(m.attention))
        for note in m.notes:
            self.emit(LogMessage(level="info", message=note))
        self.max_norm_supported = callable(getattr(net, "apply_max_norm", None))
        if cfg.scale_weight_norms and not self.max_norm_supported:   # kohya's words and behaviour
            self.emit(LogMessage(level="warning", message=f"--scale_weight_norms is specified but {cfg.network_module} "
                                 "does not support it; training without it, as kohya does"))
        self.accelerator, self.device = m.accelerator, m.device
        self.unet, self.vae, self.te = m.unet, m.vae, m.te
        groups = param_groups(m)
        self.group_names = [g["name"] for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.optim, scheduler, notes = build_optimizer(cfg, groups, plan.total_steps, self.device_type)
        for level, message in notes:
            self.emit(LogMessage(level=level, message=message))
        self.optimizer, self.lr_scheduler = m.accelerator.prepare(self.optim.optimizer, scheduler)
        self.step = TrainStep(cfg, m, plan, seed)
        self.noise_scheduler, self.alphas_cumprod = self.step.noise_scheduler, self.step.alphas_cumprod
        self.noise_gen, self.data_rng = self.step.noise_gen, self.step.data_rng
        self.saver = Saver(cfg, plan, self.run_id, self.counters, self.emit, network=net, save_dtype=m.save_dtype,
                           metadata=self._metadata, resumable=self.resumable, on_state=self._on_state,
                           optimizer=self.optimizer, guard=DiskGuard(
                               getattr(trainer, "on_disk_full", "stop"), Path(cfg.output_dir), self.emit,
                               self.control, self.channel.poll if self.channel is not None else None),
                           run_dir=run_dir)
        self.sampler = Sampler(cfg, m, self.counters, self.emit, seed=seed, num_epochs=plan.num_epochs,
                               optimizer=self.optimizer)
        self.oom = OomGuard(self)
        trainer.bus.add(self.oom)           # which phase an out-of-memory error after a step came in
        self.nan = NanPolicy(cfg, self.counters, self.emit, network=net, params=self.params,
                             optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                             forget_state=self.saver.forget_state)
        if loaded_state is not None:
            self._restore(loaded_state)
        if plan.start is not None:   # kohya's --initial_step/--initial_epoch: the run counts from there
            start = plan.start
            self.counters.place(start.step, start.epoch, start.batch)
            self.saver.state_step = None
            self.emit(LogMessage(level="info", message=start.describe()))
        self.nan.remember(self.resumable())

    # ---- what the forward pass reads (tests change the config and the caches of a loaded job)
    @property
    def cfg(self) -> TrainConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, value: TrainConfig) -> None:
        self._cfg = self.step.cfg = value

    @property
    def latent_cache(self):
        return self.step.latent_cache

    @latent_cache.setter
    def latent_cache(self, value) -> None:
        self.step.latent_cache = value

    def _encode_prompts(self, captions: list[str]):
        return self.step.encode_prompts(captions)

    def _loss(self, batch):
        return self.step.loss(batch)

    # ---- state
    def _restore(self, state) -> None:
        self.network.load_state_tensors(state.lora_tensors, source=str(state.path))
        for p in self.params:
            p.data = p.data.to(self.network.param_dtype)
        self.optimizer.load_state_dict(state.optimizer_state)
        ensure_train_mode(self.optimizer)
        self.lr_scheduler.load_state_dict(state.scheduler_state)
        restore_rng(state.rng_state, self.noise_gen, self.data_rng)
        prog = state.progress
        self.counters.place(prog.global_step, prog.epoch, prog.batch_in_epoch)
        self.nan.lr_scale, self.nan.nan_skipped = prog.lr_scale, prog.nan_skipped
        self.counters.record_state(state.path)
        self.saver.state_step = prog.global_step
        self.saver.pruner.best.resumed_at(prog.global_step)
        self.emit(LogMessage(level="info", message=f"resumed from {state.path} at step {prog.global_step}"))

    def resumable(self) -> dict:
        """What a training state holds, as it is now (live tensors: copy before keeping)."""
        progress = self.counters.to_state(seed=self.seed, run_id=self.run_id, config=self.cfg.to_dict(),
                                          lr_scale=self.nan.lr_scale, nan_skipped=self.nan.nan_skipped)
        return {
            "lora": self.network.state_tensors(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "rng": capture_rng(self.noise_gen, self.data_rng, self.device_type),
            "progress": progress,
        }

    def _on_state(self, state: dict) -> None:
        self.nan.remember(state)

    def _metadata(self, step: int, epoch: int) -> dict[str, str]:
        return run_metadata(self.cfg, self.plan, self.base, run_id=self.run_id, started_at=self.started_at,
                            seed=self.seed, step=step, epoch=epoch, optimizer=self.optim.name)

    # ---- the loop
    def train(self) -> tuple[Path | None, str]:
        try:
            return Loop(self).run()
        except BaseException as err:
            if not is_oom(err):
                raise
            what = summary(err)
        raise self.oom.stop(what)  # outside the handler: the failed step's frames (and tensors) are released
