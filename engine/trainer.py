"""The training loop: kohya ``train_network.py`` semantics for SD1.5 LoRA, UI-free.

One :class:`Trainer` runs one job. It reports through events (see ``engine.events``)
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

from engine.channel import ControlChannel
from engine.checkpoint import cleanup_temp_files, save_lora_file
from engine.config import TrainConfig, to_toml
from engine.control import TrainingControl
from engine.devices import enable_mps_fallback, pick_device, read_memory
from engine.errors import CheckpointError, ConfigError, ModelLoadError, SpykeError
from engine.kohya.metadata import run_metadata
from engine.kohya.names import checkpoint_filename, state_dirname
from engine.events import (
    CheckpointSaved,
    Event,
    EventBus,
    EventLog,
    LogMessage,
    MemorySample,
    PhaseChanged,
    RunFinished,
    RunStarted,
    StepCompleted,
)
from engine.output_guard import OutputCheck, apply_renames, check_outputs, refuse_foreign
from engine.plan import RunPlan, missing_model, plan_run
from engine.run.folder import RunFolder, new_run_id
from engine.state import (
    Progress,
    capture_rng,
    cleanup_temp_dirs,
    config_mismatches,
    find_latest_state,
    load_state,
    restore_rng,
    save_state,
)

MEMORY_SAMPLE_SECONDS = 2.0
ROLLBACK_LIMIT = 5
NAN_SKIP_LIMIT = 5


@dataclass
class RunResult:
    status: str                      # completed | aborted | failed
    global_step: int
    final_path: Path | None = None
    error: str | None = None
    run_dir: Path | None = None
    losses: list[float] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)


class NonFiniteLoss(SpykeError):
    pass


def _dtype(name: str | None):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name or "", torch.float32)


def quiet_libraries() -> None:
    """Keep diffusers/transformers progress bars and advice off the user's screen."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|diffusers)\.")


class Trainer:
    """Train one LoRA. ``loss_hook(step, loss) -> loss`` lets tests inject faults (e.g. NaN)."""

    def __init__(self, config: TrainConfig, *, control: TrainingControl | None = None,
                 sinks: Iterable[Callable[[Event], None]] = (), run_id: str | None = None,
                 loss_hook: Callable | None = None) -> None:
        self.config = config
        self.control = control or TrainingControl()
        self.bus = EventBus(sinks)
        self.run_id = run_id or os.environ.get("SPYKE_RUN_ID") or new_run_id(config.output_name or "run")
        self.channel: ControlChannel | None = None
        self.loss_hook = loss_hook
        self.run_dir: Path | None = None
        self.folder: RunFolder | None = None
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.losses: list[float] = []
        self.saved: list[Path] = []
        self.last_state_dir: Path | None = None
        self.last_checkpoint: Path | None = None
        self._log: EventLog | None = None
        self._saved_steps: set[tuple[int, str]] = set()

    # ------------------------------------------------------------------ public
    def run(self) -> RunResult:
        status, error, final_path, hint = "failed", None, None, None
        try:
            final_path, status = self._run()
            if status == "aborted":
                hint = self._resume_hint()
        except SpykeError as err:
            error = str(err)
            hint = self._resume_hint()
            self._emit(LogMessage(level="error", message=error))
        except Exception as err:  # noqa: BLE001 - reported as one line; the trace goes to the run folder
            error = f"{type(err).__name__}: {err}".splitlines()[0]
            self._write_trace()
            self._emit(LogMessage(level="error", message=error))
            hint = self._resume_hint()
        self._emit(PhaseChanged(phase="finished", detail=status))
        self._emit(RunFinished(status=status, step=self.global_step, error=error,
                               final_path=str(final_path) if final_path else None, resume_hint=hint))
        if self._log is not None:
            self._log.close()
        return RunResult(status, self.global_step, final_path, error, self.run_dir, self.losses, self.saved)

    # ------------------------------------------------------------------ plumbing
    def _emit(self, event: Event) -> None:
        self.bus.emit(event)

    def _phase(self, phase: str, detail: str = "") -> None:
        self._emit(PhaseChanged(phase=phase, detail=detail))

    def _write_trace(self) -> None:
        if self.folder is not None:
            self.folder.write_trace(traceback.format_exc())

    def _resume_hint(self) -> str | None:
        if self.last_state_dir is None:
            return None
        return f"spyke-cockpit train --headless --resume {self.last_state_dir} [your config and flags]"

    def _sample_memory(self, device_type: str) -> None:
        m = read_memory(device_type)
        self._emit(MemorySample(device=m.device, rss=m.rss, sys_used=m.sys_used, sys_available=m.sys_available,
                                sys_total=m.sys_total, allocated=m.allocated, reserved=m.reserved, peak=m.peak,
                                device_total=m.device_total))

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
            apply_renames(check.renames)
        return out, check

    def _open_run_folder(self, out: Path) -> Path:
        folder = RunFolder(out, self.run_id)
        folder.create()
        folder.write_config(to_toml(self.config))
        run_dir = folder.path
        self._log = EventLog(folder.events_path)
        self.bus.add(self._log)
        self.folder, self.run_dir = folder, run_dir
        self.channel = ControlChannel(run_dir, self.control, on_command=lambda command, sender: self._emit(
            LogMessage(level="info", message=f"control: {command.value}" + (f" from {sender}" if sender else ""))))
        return run_dir

    # ------------------------------------------------------------------ the job
    def _run(self) -> tuple[Path | None, str]:
        cfg = self.config.validate()
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
        cfg = cfg.replace(seed=seed)
        self.config = cfg
        out, outputs = self._prepare_output(plan, loaded_state.progress.global_step if loaded_state else None)
        if outputs.finished is not None:  # nothing left to train: change nothing, not even the run folder
            self.global_step = outputs.finished_step or 0
            self._emit(LogMessage(level="warning", message=outputs.finished_message()))
            return outputs.finished, "completed"
        for src, dst in outputs.renames:
            if loaded_state is not None and src.resolve() == loaded_state.path.resolve():
                loaded_state.path = dst
        resume_warnings += outputs.notes
        run_dir = self._open_run_folder(out)

        device = pick_device(cfg.device)
        device_type = device.type
        self._emit(RunStarted(
            run_id=self.run_id, output_dir=str(out), output_name=cfg.output_name, total_steps=plan.total_steps,
            num_epochs=plan.num_epochs, batches_per_epoch=plan.batches_per_epoch, device=str(device),
            pid=os.getpid(), config=cfg.to_dict(), checkpoint_steps=[c.step for c in plan.checkpoints],
            start_step=loaded_state.progress.global_step if loaded_state else 0, seed=seed))
        for warning in plan.warnings + resume_warnings:
            self._emit(LogMessage(level="warning", message=warning))
        self._phase("loading", cfg.pretrained_model_name_or_path)
        self._sample_memory(device_type)
        started_at = time.time()

        from engine.models import load_base_model

        quiet_libraries()

        base = load_base_model(cfg.pretrained_model_name_or_path,
                               sd_config_dir=Path(cfg.sd_config_dir) if cfg.sd_config_dir else None,
                               allow_pickle=cfg.allow_pickle)
        from engine.plan import check_clip_skip

        check_clip_skip(cfg.clip_skip, base.text_encoder.config.num_hidden_layers)
        job = _Job(self, cfg, plan, base, device, loaded_state, seed, started_at, run_dir)
        return job.train()


class _Job:
    """The loaded models and optimizer of one run, and the step loop over them."""

    def __init__(self, trainer: Trainer, cfg: TrainConfig, plan: RunPlan, base, device, loaded_state, seed: int,
                 started_at: float, run_dir: Path) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        from engine.lora import apply_lora

        self.t = trainer
        self.cfg = cfg
        self.plan = plan
        self.base = base
        self.seed = seed
        self.started_at = started_at
        self.run_dir = run_dir
        self.device = device
        self.device_type = device.type
        if cfg.mixed_precision == "fp16" and self.device_type == "cpu":
            raise ConfigError("--mixed_precision=fp16 needs a CUDA or MPS device; use bf16 or no on the CPU")
        AcceleratorState._reset_state(True)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=self.device_type == "cpu")
        self.device = device = self.accelerator.device if self.device_type != "cpu" else device
        set_seed(seed)

        weight_dtype = _dtype(cfg.mixed_precision)
        self.weight_dtype = weight_dtype
        self.save_dtype = _dtype(cfg.save_precision)
        unet, vae, te = base.unet, base.vae, base.text_encoder
        self.tokenizer = base.tokenizer
        unet_lr, te_lr = cfg.effective_unet_lr(), cfg.effective_text_encoder_lr()
        train_te = not cfg.network_train_unet_only
        train_unet = not cfg.network_train_text_encoder_only and unet_lr > 0
        self.network = apply_lora(unet, te, dim=cfg.network_dim, alpha=cfg.network_alpha,
                                  train_unet=train_unet, train_text_encoder=train_te,
                                  text_encoder_frozen=te_lr == 0)
        from engine.events import NetworkBuilt

        net = self.network
        trainer._emit(NetworkBuilt.of(len(net.unet_module_names), len(net.text_encoder_module_names),
                                      net.dim, net.alpha))
        self.train_te = train_te and te_lr > 0
        # Frozen base weights in the training dtype; LoRA weights stay fp32 (kohya does the same).
        unet.to(device, dtype=weight_dtype)
        te.to(device, dtype=weight_dtype)
        vae_dtype = torch.float32 if (cfg.no_half_vae or cfg.mixed_precision == "no") else weight_dtype
        vae.to(device, dtype=vae_dtype)
        vae.requires_grad_(False)
        vae.eval()
        self.vae_dtype = vae_dtype
        for p in self.network.unet_params + self.network.text_encoder_params:
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self.train_te:
                if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5.2x
                    te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        unet.train()
        te.train(self.train_te)
        self.unet, self.vae, self.te = unet, vae, te

        groups = []
        if train_unet and self.network.unet_params:
            groups.append({"params": self.network.unet_params, "lr": unet_lr, "name": "unet"})
        if self.train_te and self.network.text_encoder_params:
            groups.append({"params": self.network.text_encoder_params, "lr": te_lr, "name": "text_encoder"})
        if not groups:
            raise ConfigError("nothing to train: unet_lr and text_encoder_lr are both 0 (or the network is frozen)")
        self.group_names = [g["name"] for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                  num_training_steps=plan.total_steps, num_cycles=cfg.lr_scheduler_num_cycles,
                                  power=cfg.lr_scheduler_power)
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(optimizer, scheduler)
        self.noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000, clip_sample=False)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self.noise_gen = torch.Generator(device="cpu").manual_seed(seed)
        self.data_rng = random.Random(seed)
        self.lr_scale = 1.0
        self.nan_skipped = 0
        self.nan_in_row = 0
        self.rollbacks = 0
        self.latent_cache: dict[tuple[int, bool], object] | None = None
        self.token_cache: dict[str, object] = {}
        self.state_step: int | None = None  # global step of the last state written or resumed from
        if loaded_state is not None:
            self._restore(loaded_state)
        self.snapshot = self._capture_snapshot()

    # ------------------------------------------------------------------ state
    def _restore(self, state) -> None:
        self.network.load_state_dict_kohya(state.lora_tensors, source=str(state.path))
        for p in self.params:
            p.data = p.data.float()
        self.optimizer.load_state_dict(state.optimizer_state)
        self.lr_scheduler.load_state_dict(state.scheduler_state)
        restore_rng(state.rng_state, self.noise_gen, self.data_rng)
        prog = state.progress
        self.t.global_step, self.t.epoch, self.t.batch_in_epoch = prog.global_step, prog.epoch, prog.batch_in_epoch
        self.lr_scale, self.nan_skipped = prog.lr_scale, prog.nan_skipped
        self.t.last_state_dir = state.path
        self.state_step = prog.global_step
        self.t._emit(LogMessage(level="info", message=f"resumed from {state.path} at step {prog.global_step}"))

    def _progress(self) -> Progress:
        return Progress(global_step=self.t.global_step, epoch=self.t.epoch, batch_in_epoch=self.t.batch_in_epoch,
                        seed=self.seed, run_id=self.t.run_id, config=self.cfg.to_dict(), lr_scale=self.lr_scale,
                        nan_skipped=self.nan_skipped)

    def _capture_snapshot(self) -> dict:
        """An in-memory copy of the resumable state (used by the rollback NaN policy)."""
        import copy

        return {
            "lora": {k: v.clone() for k, v in self.network.state_dict_kohya(None).items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.lr_scheduler.state_dict()),
            "rng": copy.deepcopy(capture_rng(self.noise_gen, self.data_rng, self.device_type)),
            "progress": self._progress(),
        }

    # ------------------------------------------------------------------ saving
    def _metadata(self, step: int, epoch: int) -> dict[str, str]:
        return run_metadata(self.cfg, self.plan, self.base, run_id=self.t.run_id, started_at=self.started_at,
                            seed=self.seed, step=step, epoch=epoch)

    def current_epoch(self) -> int:
        """1-based epoch of the last completed step (the one just finished at an epoch boundary)."""
        if self.t.batch_in_epoch == 0 and self.t.global_step > 0:
            return max(1, self.t.epoch)
        return min(self.t.epoch + 1, self.plan.num_epochs)

    def save(self, kind: str, *, with_state: bool | None = None) -> Path | None:
        """Write a checkpoint (+ state when asked). ``kind``: step | epoch | final | manual | abort."""
        step, epoch = self.t.global_step, self.current_epoch()
        if kind == "final":
            name = checkpoint_filename(self.cfg.output_name)
        elif kind == "epoch":
            name = checkpoint_filename(self.cfg.output_name, epoch=epoch)
        else:
            name = checkpoint_filename(self.cfg.output_name, step=step)
        key = (step, name)
        if key in self.t._saved_steps and kind in ("manual", "abort"):
            if with_state and self.state_step != step:  # e.g. an abort right after a save without --save_state
                self.save_training_state()
            return self.t.last_checkpoint
        self.t._phase("saving", name)
        out = Path(self.cfg.output_dir)
        loss = self.t.losses[-1] if self.t.losses else None
        tensors = self.network.state_dict_kohya(self.save_dtype)
        try:
            if not self.cfg.overwrite:
                refuse_foreign(out / name, self.t.run_id)
            saved = save_lora_file(out / name, tensors, self._metadata(step, epoch))
        except CheckpointError as err:
            raise CheckpointError(f"{err}{self._state_after_failed_save()}") from None
        self.t._saved_steps.add(key)
        self.t.saved.append(saved.path)
        self.t.last_checkpoint = saved.path
        state_dir = None
        if with_state if with_state is not None else self.cfg.save_state:
            if kind != "final" and self.state_step == step and self.t.last_state_dir is not None:
                state_dir = self.t.last_state_dir  # unchanged since (e.g. aborted right after resuming)
            else:
                state_dir = self.save_training_state(final=(kind == "final"))
        self.t._emit(CheckpointSaved(path=str(saved.path), step=step, epoch=epoch, bytes=saved.bytes, kind=kind,
                                     loss=loss, verified=saved.verified,
                                     state_dir=str(state_dir) if state_dir else None))
        self.t._phase("training" if kind != "final" else "finished")
        return saved.path

    def _state_after_failed_save(self) -> str:
        """A checkpoint could not be written: keep the run resumable if a state still can be."""
        try:
            path = self.save_training_state()
        except SpykeError:
            return ""
        return f" (training state saved to {path})"

    def save_training_state(self, final: bool = False) -> Path:
        dest = Path(self.cfg.output_dir) / state_dirname(self.cfg.output_name, None if final else self.t.global_step)
        if not self.cfg.overwrite:
            refuse_foreign(dest, self.t.run_id, state=True)
        path = save_state(dest, lora_tensors=self.network.state_dict_kohya(None),
                          optimizer_state=self.optimizer.state_dict(),
                          scheduler_state=self.lr_scheduler.state_dict(),
                          rng_state=capture_rng(self.noise_gen, self.data_rng, self.device_type),
                          progress=self._progress())
        self.t.last_state_dir = path
        self.state_step = self.t.global_step
        self.snapshot = self._capture_snapshot()
        return path

    def rollback(self) -> None:
        snap = self.snapshot
        self.network.load_state_dict_kohya(snap["lora"], source="the last saved state")
        for p in self.params:
            p.data = p.data.float()
        self.optimizer.load_state_dict(snap["optimizer"])
        self.lr_scheduler.load_state_dict(snap["scheduler"])
        # The RNGs are not rewound: the same weights with the same noise would hit the same NaN again.
        self.state_step = None  # the learning rate changed: a state saved now differs from the last one
        prog = snap["progress"]
        self.t.global_step, self.t.epoch, self.t.batch_in_epoch = prog.global_step, prog.epoch, prog.batch_in_epoch
        del self.t.losses[prog.global_step:]
        self.lr_scale *= 0.5
        sched = self.lr_scheduler.scheduler if hasattr(self.lr_scheduler, "scheduler") else self.lr_scheduler
        sched.base_lrs = [b * self.lr_scale for b in sched.base_lrs]
        for group, base_lr in zip(self.optimizer.param_groups, sched.base_lrs):
            group["initial_lr"] = base_lr
        sched.last_epoch -= 1
        sched.step()

    # ------------------------------------------------------------------ data
    def _encode_prompts(self, captions: list[str]):
        import torch

        ids = []
        for caption in captions:
            cached = self.token_cache.get(caption)
            if cached is None:
                cached = self.tokenizer(caption, padding="max_length", truncation=True,
                                        max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
                self.token_cache[caption] = cached
            ids.append(cached)
        input_ids = torch.stack(ids).to(self.device)
        clip_skip = self.cfg.clip_skip or 1
        with torch.set_grad_enabled(self.train_te):
            if clip_skip > 1:
                out = self.te(input_ids, output_hidden_states=True)
                hidden = out.hidden_states[-clip_skip]
                text_model = getattr(self.te, "text_model", self.te)
                hidden = text_model.final_layer_norm(hidden)
            else:
                hidden = self.te(input_ids).last_hidden_state
        return hidden

    def _vae_latents(self, pixels, generator):
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, dtype=self.vae_dtype)).latent_dist
            return dist.sample(generator=generator) * 0.18215

    def cache_latents(self) -> None:
        import torch

        entries = self.plan.dataset.entries
        flips = (False, True) if any(getattr(e, "flip_aug", False) for e in entries) or self.cfg.flip_aug else (False,)
        total = len(entries) * len(flips)
        self.t._phase("caching", f"0/{total}")
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        cache = {}
        done = 0
        for index in range(len(entries)):
            for flip in flips:
                pixels = self.plan.dataset.load_image(index, flip=flip).unsqueeze(0)
                cache[(index, flip)] = self._vae_latents(pixels, gen)[0].to(self.weight_dtype)
                done += 1
                if done % 8 == 0 or done == total:
                    self.t._phase("caching", f"{done}/{total}")
        self.latent_cache = cache

    def _batch_latents(self, batch):
        import torch

        if self.latent_cache is not None:
            return torch.stack([self.latent_cache[(i, f)] for i, f in zip(batch.entry_indices, batch.flipped)])
        return self._vae_latents(batch.pixel_values, self.noise_gen).to(self.weight_dtype)

    # ------------------------------------------------------------------ one step
    def _loss(self, batch):
        import torch
        import torch.nn.functional as F

        latents = self._batch_latents(batch)
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.noise_gen, dtype=torch.float32).to(self.device,
                                                                                             latents.dtype)
        if self.cfg.noise_offset:
            offset = torch.randn((b, latents.shape[1], 1, 1), generator=self.noise_gen)
            noise = noise + self.cfg.noise_offset * offset.to(self.device, noise.dtype)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,),
                                  generator=self.noise_gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            hidden = self._encode_prompts(batch.captions)
            pred = self.unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
        weights = torch.where(batch.is_reg.to(self.device), self.cfg.prior_loss_weight, 1.0)
        loss = loss * weights
        if self.cfg.min_snr_gamma:
            ac = self.alphas_cumprod[timesteps]
            snr = ac / (1.0 - ac)
            loss = loss * torch.clamp(snr, max=self.cfg.min_snr_gamma) / snr
        return loss.mean()

    def _grads_finite(self) -> bool:
        import torch

        norm = None
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            if self.cfg.mixed_precision == "fp16":   # unscales through the grad scaler first
                norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        if self.cfg.mixed_precision == "fp16":
            return True  # the grad scaler skips inf/NaN updates itself
        if norm is None:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
                else torch.tensor(0.0)
        return bool(torch.isfinite(norm))

    def _on_nonfinite(self, step: int, what: str) -> str:
        """Apply the NaN policy. Returns 'skip', 'rollback' or raises NonFiniteLoss (stop)."""
        policy = self.cfg.nan_policy
        last = self.t.last_checkpoint
        hint = self.t._resume_hint()
        msg = f"non-finite {what} at step {step}"
        if policy == "skip":
            self.nan_skipped += 1
            self.nan_in_row += 1
            self.t._emit(LogMessage(level="warning", message=f"{msg}: update skipped "
                                    f"({self.nan_in_row} in a row, {self.nan_skipped} in all)"))
            if self.nan_in_row >= NAN_SKIP_LIMIT:
                raise NonFiniteLoss(f"{msg}: {NAN_SKIP_LIMIT} skipped steps in a row, stopping; last good "
                                    f"checkpoint: {last or 'none'}")
            return "skip"
        if policy == "rollback":
            self.rollbacks += 1
            if self.rollbacks > ROLLBACK_LIMIT:
                raise NonFiniteLoss(f"{msg}: still non-finite after {ROLLBACK_LIMIT} rollbacks, stopping; last "
                                    f"good checkpoint: {last or 'none'}")
            back_to = self.snapshot["progress"].global_step
            self.rollback()
            self.t._emit(LogMessage(level="warning", message=f"{msg}: rolled back to step {back_to}, learning "
                                    f"rate now x{self.lr_scale:g}"))
            return "rollback"
        raise NonFiniteLoss(f"{msg}; stopped before it reached the weights. Last good checkpoint: "
                            f"{last or 'none'}" + (f"; resume with: {hint}" if hint else ""))

    # ------------------------------------------------------------------ the loop
    def train(self) -> tuple[Path | None, str]:
        import torch

        t, cfg, plan = self.t, self.cfg, self.plan
        if cfg.cache_latents:
            self.cache_latents()
        t._phase("training")
        accum = cfg.gradient_accumulation_steps
        control = t.control
        poll = t.channel.poll if t.channel is not None else None

        def on_pause(entering: bool) -> None:
            t._phase("paused" if entering else "training")
            if entering:
                self._sample(force=True)

        def on_save() -> None:
            self.save("manual")
            t._phase("paused")

        self._last_mem = 0.0
        groups: list = []
        groups_epoch = None
        while t.global_step < plan.total_steps and t.epoch < plan.num_epochs:
            if groups_epoch != t.epoch:
                batches = plan.dataset.epoch_batches(t.epoch, self.seed)
                groups = [batches[i:i + accum] for i in range(0, len(batches), accum)]
                groups_epoch = t.epoch
            decision = control.between_steps(on_pause, on_save, poll)
            if decision.save_now and not decision.abort:
                self.save("manual")
            if decision.abort:
                return self._abort(decision.abort_save)
            step_started = time.perf_counter()
            step = t.global_step + 1
            loss_value = 0.0
            nonfinite = None
            group = groups[t.batch_in_epoch]
            for batch_ids in group:
                batch = plan.dataset.load_batch(batch_ids, self.data_rng)
                loss = self._loss(batch)
                if t.loss_hook is not None:
                    loss = t.loss_hook(step, loss)
                if not torch.isfinite(loss):
                    nonfinite = "loss"
                    break
                self.accelerator.backward(loss / accum)
                loss_value += float(loss.detach()) / len(group)
            if nonfinite is None and not self._grads_finite():
                nonfinite = "gradient"
            skipped = False
            if nonfinite is not None:
                self.optimizer.zero_grad(set_to_none=True)
                if self._on_nonfinite(step, nonfinite) == "rollback":
                    continue
                skipped = True
                loss_value = float("nan")
            else:
                self.nan_in_row = 0
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            lrs = {name: float(g["lr"]) for name, g in zip(self.group_names, self.optimizer.param_groups)}
            self.lr_scheduler.step()
            epoch_number = t.epoch + 1
            t.global_step = step
            t.batch_in_epoch += 1
            t.losses.append(loss_value)
            t._emit(StepCompleted(step=step, epoch=epoch_number, loss=loss_value, lrs=lrs,
                                  step_seconds=time.perf_counter() - step_started, skipped=skipped))
            self._sample()
            epoch_done = t.batch_in_epoch >= len(groups)
            if epoch_done:
                t.epoch += 1
                t.batch_in_epoch = 0
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
                self.save("step")
            if epoch_done and cfg.save_every_n_epochs and t.epoch % cfg.save_every_n_epochs == 0 \
                    and t.epoch < plan.num_epochs and step < plan.total_steps:
                self.save("epoch")
        final = self.save("final")
        return final, "completed"

    def _sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_mem >= MEMORY_SAMPLE_SECONDS:
            self._last_mem = now
            self.t._sample_memory(self.device_type)

    def _abort(self, save: bool) -> tuple[Path | None, str]:
        path = None
        if save and self.t.global_step > 0:
            path = self.save("abort", with_state=True)
        elif save:
            self.save_training_state()
        self.t._emit(LogMessage(level="info", message=f"aborted at step {self.t.global_step}" + (
            f"; saved {path}" if path else "")))
        return path, "aborted"
