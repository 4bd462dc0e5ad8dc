"""One training step's forward and backward: latents, noise, timesteps, the text encoding
(with ``clip_skip``) and the loss (:meth:`TrainStep.loss`, where other losses plug in)."""

from __future__ import annotations

import random
from typing import Callable

from engine.config import TrainConfig
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
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(models.device)
        self.noise_gen = torch.Generator(device="cpu").manual_seed(seed)
        self.data_rng = random.Random(seed)
        self.latent_cache: dict[tuple[int, bool], object] | None = None
        self.token_cache: dict[str, object] = {}
        self.fixed_timestep: int | None = None     # set only during a validation pass

    # ---- inputs
    def encode_prompts(self, captions: list[str]):
        import torch

        tokenizer, te = self.m.tokenizer, self.m.te
        ids = []
        for caption in captions:
            cached = self.token_cache.get(caption)
            if cached is None:
                cached = tokenizer(caption, padding="max_length", truncation=True,
                                   max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
                self.token_cache[caption] = cached
            ids.append(cached)
        input_ids = torch.stack(ids).to(self.device)
        clip_skip = self.cfg.clip_skip or 1
        with torch.set_grad_enabled(self.m.train_te):
            if clip_skip > 1:
                out = te(input_ids, output_hidden_states=True)
                hidden = out.hidden_states[-clip_skip]
                text_model = getattr(te, "text_model", te)
                hidden = text_model.final_layer_norm(hidden)
            else:
                hidden = te(input_ids).last_hidden_state
        return hidden

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
                    key = cache_key(image_sha256(e.path), e.bucket, e.resized_size, flip, vae_id)
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
        self.latent_cache = cache

    def batch_latents(self, batch):
        import torch

        if self.latent_cache is not None:
            return torch.stack([self.latent_cache[(i, f)] for i, f in zip(batch.entry_indices, batch.flipped)])
        return self.vae_latents(batch.pixel_values, self.noise_gen).to(self.m.weight_dtype)

    # ---- the loss
    def timesteps(self, b: int):
        """The batch's timesteps: uniform draws from the noise RNG, or ``fixed_timestep`` (a validation pass)."""
        import torch

        if self.fixed_timestep is not None:
            return torch.full((b,), self.fixed_timestep, dtype=torch.long, device=self.device)
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,),
                             generator=self.noise_gen).to(self.device)

    def loss(self, batch):
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        latents = self.batch_latents(batch)
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.noise_gen, dtype=torch.float32).to(self.device,
                                                                                             latents.dtype)
        if cfg.noise_offset:
            offset = torch.randn((b, latents.shape[1], 1, 1), generator=self.noise_gen)
            noise = noise + cfg.noise_offset * offset.to(self.device, noise.dtype)
        timesteps = self.timesteps(b)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.m.accelerator.autocast():
            hidden = self.encode_prompts(batch.captions)
            pred = self.m.unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
        weights = torch.where(batch.is_reg.to(self.device), cfg.prior_loss_weight, 1.0)
        loss = loss * weights
        if cfg.min_snr_gamma:
            ac = self.alphas_cumprod[timesteps]
            snr = ac / (1.0 - ac)
            loss = loss * torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        return loss.mean()

    # ---- forward + backward
    def forward_backward(self, group: list, step: int, loss_hook: Callable | None, *,
                         epoch: int | None = None) -> tuple[float, str | None]:
        """Accumulate the gradients of one optimizer step's batches. Returns (mean loss, None), or
        (partial loss, "loss") at the first non-finite loss, which is not backpropagated. ``epoch`` is
        1-based and ``step`` the step being made (caption dropout per epoch, token warm-up)."""
        import torch

        accum = self.cfg.gradient_accumulation_steps
        loss_value = 0.0
        for batch_ids in group:
            batch = self.plan.dataset.load_batch(batch_ids, self.data_rng, epoch=epoch, step=step - 1)
            loss = self.loss(batch)
            if loss_hook is not None:
                loss = loss_hook(step, loss)
            if not torch.isfinite(loss):
                return loss_value, "loss"
            self.m.accelerator.backward(loss / accum)
            loss_value += float(loss.detach()) / len(group)
        return loss_value, None
