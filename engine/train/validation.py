"""The validation loss on the held-out images (``--validation_split``), kohya v0.10 semantics.

What kohya's ``train_network.py`` does, and this module with it:

* the held-out images (``DatasetPlan.validation``, split when the dataset plan is built) are run
  in a fixed order, at most ``--max_validation_steps`` batches; each batch at the 4 fixed
  timesteps ``linspace(0, 1000, 6)[1:-1]`` = 200, 400, 600, 800 (kohya's
  ``NUM_VALIDATION_TIMESTEPS``); the value is the mean of the batch losses over (batch, timestep),
  with the training loss's own weighting (``TrainStep.loss``);
* every pass reseeds its randomness from ``--validation_seed`` (else ``--seed``), so the noise,
  the VAE latent sample and any caption/flip draw are the same for every image at every pass:
  two checkpoints' values compare, and the curve is smooth. The pass draws only from its own
  ``torch.Generator`` and ``random.Random``: the training RNGs are not touched (kohya swaps the
  global RNG state in and out; here nothing global is used);
* the model is in eval mode under ``no_grad`` (a schedule-free optimizer's eval weights), and
  put back as it was;
* when: every ``--validate_every_n_steps`` steps, and at the end of every epoch (every
  ``--validate_every_n_epochs``-th when set; kohya's default is every epoch); and here also at
  every checkpoint. Two requests at one step make one pass; a ``ValidationLoss`` event is
  emitted per checkpoint file of that step (its path), or one without a path.

Departure: kohya's ``loss/validation/*_average`` is a ``LossRecorder`` mean that, within the
first epoch, also averages the earlier passes; here each event is its own pass's mean.
"""

from __future__ import annotations

import random
from pathlib import Path

from engine.events import PhaseChanged, ValidationLoss

NUM_VALIDATION_TIMESTEPS = 4      # kohya: 200, 400, 600, 800 of 1000


def validation_timesteps(min_timestep: int = 0, max_timestep: int = 1000) -> list[int]:
    """kohya's ``np.linspace(min, max, N + 2, dtype=int)[1:-1]``."""
    import numpy as np

    return [int(t) for t in np.linspace(min_timestep, max_timestep, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]]


class Validator:
    """Decides when a validation pass is due, runs it, and reports it. Inert without held-out images."""

    def __init__(self, job) -> None:
        self.job = job
        self.cfg, self.plan = job.cfg, job.plan
        self.images = job.plan.dataset.validation
        self.enabled = self.images is not None
        self.seed = int(self.cfg.validation_seed if self.cfg.validation_seed is not None else job.seed)
        self.timesteps = validation_timesteps()
        self._step: int | None = None        # the step of the last pass (its value holds until the next step)
        self._loss = 0.0
        self._pending: tuple[int, int, list[str], list[Path]] | None = None
        self._reported: set[str] = set()    # the files of this step already reported

    # ---- when
    def kinds_at(self, step: int, epoch: int, epoch_ended: bool) -> list[str]:
        """Why kohya validates after ``step``: "step" (every n steps), "epoch" (an epoch's end)."""
        kinds = []
        n = self.cfg.validate_every_n_steps
        if n and step % n == 0:
            kinds.append("step")
        if epoch_ended or step >= self.plan.last_step:   # kohya validates after the last, cut-short epoch too
            m = self.cfg.validate_every_n_epochs
            if m is None or epoch % m == 0:
                kinds.append("epoch")
        return kinds

    def after_step(self, step: int, epoch: int, epoch_ended: bool, saved: list[Path | None]) -> None:
        """After optimizer step ``step`` and the files saved at it (``epoch`` 1-based)."""
        if not self.enabled:
            return
        self._step = None                    # the weights changed: an earlier pass no longer holds
        self._reported = set()
        paths = [p for p in saved if p is not None]
        kinds = self.kinds_at(step, epoch, epoch_ended) + (["checkpoint"] if paths else [])
        if not kinds:
            return
        if step >= self.plan.last_step:    # the final file follows: one pass for it and this step
            self._pending = (step, epoch, kinds, paths)
            return
        self._report(step, epoch, kinds, paths, then="training")

    def at_checkpoint(self, step: int, epoch: int, path: Path | None, *, then: str = "training") -> None:
        """A file saved between steps (a manual save, the final file): its validation loss."""
        if not self.enabled or path is None:
            return
        kinds, paths = ["checkpoint"], [path]
        if self._pending is not None and self._pending[0] == step:
            _, epoch, pending_kinds, pending_paths = self._pending
            kinds = pending_kinds + ([] if "checkpoint" in pending_kinds else ["checkpoint"])
            paths = pending_paths + paths
        self._pending = None
        self._report(step, epoch, kinds, paths, then=then)

    def _report(self, step: int, epoch: int, kinds: list[str], paths: list[Path], *, then: str) -> None:
        if self._step != step:
            self._loss = self.compute(epoch, step, then=then)
            self._step = step
            first_kinds = kinds
        else:
            first_kinds = ["checkpoint"]
            paths = [p for p in paths if str(p) not in self._reported]
            if not paths:
                return
        self._reported.update(str(p) for p in paths)
        count = len(self.batches())
        images = sum(len(b) for b in self.batches())
        for i, path in enumerate(paths or [None]):
            self.job.emit(ValidationLoss(step=step, epoch=epoch, loss=self._loss, images=images,
                                         checkpoint=str(path) if path is not None else None,
                                         kinds=list(first_kinds if i == 0 else ["checkpoint"]), batches=count))
            if path is not None:             # the lowest-loss checkpoint is kept from --save_last_n_* pruning
                self.job.saver.pruner.validated(path, step, self._loss)

    # ---- the pass
    def batches(self) -> list[list[int]]:
        batches = self.images.validation_batches()
        cap = self.cfg.max_validation_steps
        return batches[:cap] if cap else batches

    def compute(self, epoch: int, step: int, *, then: str = "training") -> float:
        """One pass: the mean loss over the batches and the fixed timesteps."""
        import torch

        from engine.optimizers import eval_weights

        job, st = self.job, self.job.step
        batches = self.batches()
        self.job.emit(PhaseChanged(phase="validating", detail=f"{sum(len(b) for b in batches)} images"))
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        rng = random.Random(self.seed)
        modules = [m for m in (job.unet, job.te) if m is not None]     # the LoRA layers live inside them
        was_training = [m.training for m in modules]
        kept = (st.noise_gen, st.latent_cache, st.fixed_timestep, st.m.train_te)
        total, count = 0.0, 0
        try:
            st.noise_gen = gen
            st.m.train_te = False                          # the text encoder too runs without a graph
            with eval_weights(job.optimizer), torch.no_grad():
                for m in modules:
                    m.eval()
                for ids in batches:
                    batch = self.images.load_batch(ids, rng, epoch=epoch, step=step)
                    st.latent_cache = None
                    latents = st.batch_latents(batch)      # one VAE sample per image per pass, from ``gen``
                    st.latent_cache = {key: latents[k] for k, key in
                                       enumerate(zip(batch.entry_indices, batch.flipped))}
                    for t in self.timesteps:
                        st.fixed_timestep = t
                        total += float(st.loss(batch))
                        count += 1
        finally:
            st.noise_gen, st.latent_cache, st.fixed_timestep, st.m.train_te = kept
            for m, flag in zip(modules, was_training):
                m.train(flag)
            self.job.emit(PhaseChanged(phase=then, detail=""))
        return total / count if count else float("nan")
