"""One training step's forward and backward: latents, noise, timesteps, the text encoding
(with ``clip_skip``) and the loss (:meth:`TrainStep.loss`, where other losses plug in)."""

from __future__ import annotations

import math
import random
from typing import Callable

from engine.config import TrainConfig
from engine.train.readout import StepLoss
from engine.train.setup import Models

VAE_SCALE = 0.18215     # SD1's latent scaling factor


class TrainStep:
    """The noise schedule, the run's two RNGs and the caches the forward pass uses."""

    def __init__(self, cfg: TrainConfig, models: Models, plan, seed: int) -> None:
        import torch
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.m = models
        self.plan = plan
        self.seed = seed
        self.device = models.device
        self.noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000, clip_sample=False)
        from engine.train.losses import apply_zero_terminal_snr, snr_table

        # kohya takes the SNR weights from the schedule before --zero_terminal_snr rescales it
        self.all_snr = snr_table(self.noise_scheduler.alphas_cumprod).to(models.device)
        if cfg.zero_terminal_snr:
            apply_zero_terminal_snr(self.noise_scheduler)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(models.device)
        self.noise_gen = torch.Generator(device="cpu").manual_seed(seed)
        self.data_rng = random.Random(seed)
        self.latent_cache: dict[tuple[int, bool], object] | None = None
        self.cached_latents: dict[tuple[int, bool], object] | None = None   # the training images' cache
        self.token_cache: dict[str, object] = {}
        self.fixed_timestep: int | None = None     # set only during a validation pass

    # ---- inputs
    def encode_prompts(self, captions: list[str]):
        """The captions' text conditioning, kohya's way (``--max_token_length`` chunks, ``clip_skip``,
        ``--weighted_captions``)."""
        import torch

        from engine.text_encoding import caption_token_ids, encode_captions, weigh_captions, weighted_caption_token_ids

        weighted = self.cfg.weighted_captions
        ids, weights = [], []
        for caption in captions:
            cached = self.token_cache.get(caption)
            if cached is None:
                cached = (weighted_caption_token_ids(self.m.tokenizer, caption, self.cfg.max_token_length) if weighted
                          else (caption_token_ids(self.m.tokenizer, caption, self.cfg.max_token_length), None))
                self.token_cache[caption] = cached
            ids.append(cached[0])
            weights.append(cached[1])
        input_ids = torch.stack(ids).to(self.device)
        with torch.set_grad_enabled(self.m.train_te):
            hidden = encode_captions(self.m.te, input_ids, self.cfg.clip_skip)
            return weigh_captions(hidden, torch.stack(weights).to(self.device)) if weighted else hidden

    def vae_latents(self, pixels, generator):
        import torch

        with torch.no_grad():
            dist = self.m.vae.encode(pixels.to(self.device, dtype=self.m.vae_dtype)).latent_dist
            return dist.sample(generator=generator) * VAE_SCALE

    def cache_latents(self, phase: Callable[[str, str], None]) -> None:
        """Encode every image (and its flip, when any subset flips) once, reporting progress to ``phase``.
        With ``--cache_latents_to_disk`` the VAE's moments (mean and log-variance, not a sample) come from
        and go to the on-disk cache, so a cold, a warm and no disk cache give the same run."""
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        from engine.latent_cache import LatentDiskCache, cache_key, image_sha256, vae_identity

        entries = self.plan.dataset.entries
        flips = (False, True) if any(getattr(e, "flip_aug", False) for e in entries) or self.cfg.flip_aug else (False,)
        total = len(entries) * len(flips)
        phase("caching", f"0/{total}")
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        disk = LatentDiskCache() if self.cfg.cache_latents_to_disk else None
        vae_id = vae_identity(self.m.vae, self.m.vae_dtype) if disk is not None else ""
        cache = {}
        done = 0
        for index in range(len(entries)):
            e = entries[index]
            for flip in flips:
                if disk is None:
                    pixels = self.plan.dataset.load_image(index, flip=flip).unsqueeze(0)
                    cache[(index, flip)] = self.vae_latents(pixels, gen)[0].to(self.m.weight_dtype)
                else:
                    key = cache_key(image_sha256(e.path), e.bucket, e.resized_size, flip, vae_id,
                                    self.plan.dataset.resize_method(index))
                    moments = disk.get(key)
                    if moments is None:
                        pixels = self.plan.dataset.load_image(index, flip=flip).unsqueeze(0)
                        with torch.no_grad():
                            moments = self.m.vae.encode(pixels.to(self.device, dtype=self.m.vae_dtype)
                                                        ).latent_dist.parameters[0]
                        disk.put(key, moments)
                    dist = DiagonalGaussianDistribution(moments[None].to(self.device, dtype=self.m.vae_dtype))
                    cache[(index, flip)] = (dist.sample(generator=gen) * VAE_SCALE)[0].to(self.m.weight_dtype)
                done += 1
                if done % 8 == 0 or done == total:
                    phase("caching", f"{done}/{total}")
        self.latent_cache = self.cached_latents = cache

    def batch_latents(self, batch):
        import torch

        if self.latent_cache is not None:
            return torch.stack([self.latent_cache[(i, f)] for i, f in zip(batch.entry_indices, batch.flipped)])
        return self.vae_latents(batch.pixel_values, self.noise_gen).to(self.m.weight_dtype)

    def batch_masks(self, batch):
        """The batch's loss masks (kohya masks whenever a sample has one, --masked_loss or not); with
        cached latents, the masks of the cached centre crop."""
        masks = getattr(batch, "masks", None)
        if masks is None or self.latent_cache is None or self.latent_cache is not self.cached_latents:
            return masks       # latents of these very pixels (no cache, or a validation pass's own)
        return self.plan.dataset.masks.batch(batch.entry_indices, batch.flipped, None)

    # ---- the loss
    def noise_and_timesteps(self, latents):
        """kohya's ``get_noise_noisy_latents_and_timesteps``: (noise, noisy latents, timesteps). The draws
        come in kohya's order from the noise generator; options left off draw nothing. During a validation
        pass ``fixed_timestep`` replaces the timestep draw (the validator brings its own generator)."""
        import torch

        from engine.train import losses

        cfg, gen = self.cfg, self.noise_gen
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
        if cfg.noise_offset:
            strength = cfg.noise_offset
            if cfg.noise_offset_random_strength:
                strength = torch.rand(1, generator=gen) * cfg.noise_offset
            noise = losses.offset_noise(latents, noise, strength, cfg.adaptive_noise_scale, gen)
        if cfg.multires_noise_iterations:
            noise = losses.pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, gen)
        total = self.noise_scheduler.config.num_train_timesteps
        low = 0 if cfg.min_timestep is None else cfg.min_timestep
        high = total if cfg.max_timestep is None else cfg.max_timestep
        if self.fixed_timestep is not None:           # a validation pass: kohya's fixed timesteps
            timesteps = torch.full((b,), self.fixed_timestep, dtype=torch.long, device=self.device)
        else:
            timesteps = losses.sample_timesteps(low, high, b, gen).to(self.device)
        noised = noise
        if cfg.ip_noise_gamma:
            strength = cfg.ip_noise_gamma
            if cfg.ip_noise_gamma_random_strength:
                strength = float(torch.rand(1, generator=gen)) * cfg.ip_noise_gamma
            extra = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
            noised = noise + strength * extra
        return noise, self.noise_scheduler.add_noise(latents, noised, timesteps), timesteps

    def loss(self, batch):
        """kohya's loss: the target (noise, or the velocity with --v_parameterization), the element-wise
        loss of --loss_type, its mean per sample, the sample weights, then the SNR-based weights."""
        import torch

        from engine.train import losses

        cfg = self.cfg
        latents = self.batch_latents(batch)
        noise, noisy, timesteps = self.noise_and_timesteps(latents)
        with self.m.accelerator.autocast():
            hidden = self.encode_prompts(batch.captions)
            pred = self.m.unet(noisy, timesteps, hidden).sample
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps) if cfg.v_parameterization else noise
        huber_c = None
        if cfg.loss_type in ("huber", "smooth_l1"):
            huber_c = losses.huber_threshold(cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, timesteps,
                                             self.alphas_cumprod, self.noise_scheduler.config.num_train_timesteps)
        loss = losses.elementwise_loss(pred.float(), target.float(), cfg.loss_type, huber_c)
        loss = losses.apply_masked_loss(loss, self.batch_masks(batch)).mean(dim=[1, 2, 3])
        weights = torch.where(batch.is_reg.to(self.device), cfg.prior_loss_weight, 1.0)
        loss = loss * weights
        snr = self.all_snr[timesteps]
        if cfg.min_snr_gamma:
            loss = losses.min_snr_weight(loss, snr, cfg.min_snr_gamma, cfg.v_parameterization)
        if cfg.scale_v_pred_loss_like_noise_pred:
            loss = losses.scale_v_like_noise(loss, snr)
        if cfg.v_pred_like_loss:
            loss = losses.add_v_like_loss(loss, snr, cfg.v_pred_like_loss)
        if cfg.debiased_estimation_loss:
            loss = losses.debiased_estimation(loss, snr, cfg.v_parameterization)
        return loss.mean()

    # ---- forward + backward
    def forward_backward(self, group: list, step: int, loss_hook: Callable | None, *,
                         epoch: int | None = None, read_last: bool = True) -> StepLoss:
        """Accumulate the gradients of one optimizer step's batches. Each loss is read once, before its
        backward pass, and the first non-finite one stops there unbackpropagated (``nonfinite="loss"``).
        With ``read_last=False`` the last batch's loss is backpropagated unread and left ``pending`` for
        :func:`engine.train.readout.finish_read`. ``epoch`` is 1-based and ``step`` the step being made
        (caption dropout per epoch, token warm-up)."""
        accum = self.cfg.gradient_accumulation_steps
        result = StepLoss(0.0, batches=len(group))
        for i, batch_ids in enumerate(group):
            batch = self.plan.dataset.load_batch(batch_ids, self.data_rng, epoch=epoch, step=step - 1)
            loss = self.loss(batch)
            if loss_hook is not None:
                loss = loss_hook(step, loss)
            if not read_last and i == len(group) - 1:
                self.m.accelerator.backward(loss / accum)
                result.pending = loss.detach()
                return result
            value = float(loss.detach())        # this batch's one host read: the NaN guard and the step's loss
            if not math.isfinite(value):
                result.nonfinite = "loss"
                return result
            self.m.accelerator.backward(loss / accum)
            result.value += value / len(group)
        return result
