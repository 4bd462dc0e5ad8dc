"""Sample images during a run: when kohya's ``train_network.py`` makes them, at every checkpoint, and on request.

kohya's points (its ``sample_images`` conditions):

* before the first step, with ``--sample_at_first`` (named as epoch 0: ``e000000``);
* after a step when ``global_step % --sample_every_n_steps == 0``, unless ``--sample_every_n_epochs``
  is set (then only that counts);
* at an epoch's end when ``epoch % --sample_every_n_epochs == 0`` (named ``e<epoch:06d>``).

Besides, with a prompts file, every saved checkpoint gets its images (once per step: a checkpoint saved
at a step already sampled shares that batch), and ``Command.SAMPLE`` makes a batch at the next step
boundary (at once while paused). The prompts file is read again each time, so it may be edited mid-run.
A prompt without ``--d`` is drawn with ``run seed + its index``, so every checkpoint's image set comes
from the same noise. Sampling uses the model being trained in eval mode under no_grad and puts modes
and RNG states back (``engine.sample.generate``), so the run's losses are those of a run without it.
A failure is a warning line; it never stops training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from engine.config import TrainConfig
from engine.events import Event, LogMessage, PhaseChanged, SamplesSaved
from engine.optimizers import eval_weights
from engine.train.progress import StepCounters


class Sampler:
    """Makes the run's sample batches; ``enabled`` only with ``--sample_prompts``."""

    def __init__(self, cfg: TrainConfig, models, counters: StepCounters, emit: Callable[[Event], None], *,
                 seed: int, num_epochs: int, optimizer=None) -> None:
        self.cfg, self.m, self.counters, self.emit = cfg, models, counters, emit
        self.seed, self.num_epochs, self.optimizer = seed, num_epochs, optimizer
        self.enabled = bool(cfg.sample_prompts)
        self.sampled_steps: set[int] = set()
        self.seconds_per_image: list[float] = []

    # ---- kohya's points
    def at_start(self) -> None:
        if self.enabled and self.cfg.sample_at_first:
            self.sample(epoch=0)

    def after_step(self, step: int, *, epoch_ended: int | None, checkpoint: Path | None) -> None:
        """After step ``step`` (and its saves): kohya's step or epoch-end sampling, else the checkpoint's."""
        if not self.enabled:
            return
        cfg = self.cfg
        if cfg.sample_every_n_epochs is not None:
            if epoch_ended is not None and epoch_ended % cfg.sample_every_n_epochs == 0:
                self.sample(epoch=epoch_ended, checkpoint=checkpoint)
                return
        elif cfg.sample_every_n_steps is not None and step % cfg.sample_every_n_steps == 0:
            self.sample(checkpoint=checkpoint)
            return
        if checkpoint is not None:
            self.for_checkpoint(checkpoint)

    def for_checkpoint(self, checkpoint: Path | None, *, previous: str = "training") -> None:
        """A checkpoint was saved: its images, unless this step has them already."""
        if self.enabled and checkpoint is not None and self.counters.global_step not in self.sampled_steps:
            self.sample(checkpoint=checkpoint, previous=previous)

    def on_request(self, *, previous: str = "training") -> None:
        if not self.enabled:
            self.emit(LogMessage(level="warning", message="no sample images: give --sample_prompts=<prompts.txt> "
                                                          "to make them"))
            return
        self.sample(previous=previous)

    # ---- one batch
    def sample(self, *, epoch: int | None = None, checkpoint: Path | None = None, previous: str = "training") -> None:
        """One batch of images for every prompt of the file as it is now; never raises."""
        from engine.sample.prompts import load_prompts

        c = self.counters
        step = c.global_step
        self.sampled_steps.add(step)
        loaded = load_prompts(self.cfg.sample_prompts)
        for problem in loaded.problems:
            self.emit(LogMessage(level="warning", message=f"sample images: {problem}"))
        if not loaded.prompts:
            return
        self.emit(PhaseChanged(phase="sampling", detail=f"{len(loaded.prompts)} images at step {step}"))
        started = time.perf_counter()
        try:
            results = self._draw(loaded.prompts, step, epoch)
        except Exception as exc:  # noqa: BLE001 - sampling must never stop training
            self.emit(LogMessage(level="warning", message=f"sample images at step {step} failed: "
                                                          f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
            self.emit(PhaseChanged(phase=previous, detail=""))
            return
        for r in results:
            if r.ok:
                self.seconds_per_image.append(r.seconds)
            else:
                self.emit(LogMessage(level="warning", message=f"sample image not made: {r.error}"))
        self.emit(SamplesSaved(
            step=step, epoch=epoch if epoch is not None else c.current_epoch(self.num_epochs),
            paths=[str(r.path) if r.path else "" for r in results], prompts=[r.prompt.prompt for r in results],
            seeds=[r.seed for r in results], errors=[r.error or "" for r in results],
            checkpoint=str(checkpoint) if checkpoint else None, seconds=time.perf_counter() - started))
        self.emit(PhaseChanged(phase=previous, detail=""))

    def _draw(self, prompts, step: int, epoch: int | None):
        from engine.sample.generate import generate_samples

        m = self.m
        with eval_weights(self.optimizer):  # a schedule-free optimizer samples with its eval weights, as kohya
            return generate_samples(
                m.unet, m.te, m.vae, m.tokenizer, prompts, output_dir=self.cfg.output_dir,
                output_name=self.cfg.output_name, step=step, epoch=epoch, device=m.device, dtype=m.weight_dtype,
                clip_skip=self.cfg.clip_skip, sampler=self.cfg.sample_sampler, default_seed=self.seed)
