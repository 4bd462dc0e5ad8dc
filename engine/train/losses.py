"""kohya's loss and noise options as pure functions on tensors (sd-scripts' ``train_util`` and
``custom_train_functions`` semantics), used by :meth:`engine.train.step.TrainStep.loss`.

Every random draw takes the run's noise generator, so a run stays reproducible and resumable;
kohya draws the same quantities from torch's (and Python's) global generators.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SNR_CAP = 1000.0     # kohya caps the SNR at 1000 where it divides by it (timestep 0 is near infinite)


# ---------------------------------------------------------------- the noise schedule
def snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """kohya's ``all_snr``: alpha_bar / (1 - alpha_bar) per timestep."""
    return (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so the last timestep has zero SNR (arXiv:2305.08891, Algorithm 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def apply_zero_terminal_snr(scheduler) -> None:
    """Give a DDPM scheduler zero-terminal-SNR betas, as kohya's ``--zero_terminal_snr`` does."""
    betas = zero_terminal_snr_betas(scheduler.betas)
    scheduler.betas = betas
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)


# ---------------------------------------------------------------- noise and timesteps
def offset_noise(latents: torch.Tensor, noise: torch.Tensor, strength, adaptive_scale: float | None,
                 generator: torch.Generator) -> torch.Tensor:
    """``--noise_offset``: one extra normal value per sample and channel, times ``strength``; with
    ``--adaptive_noise_scale`` the strength grows by that scale times |mean| of each latent channel."""
    if adaptive_scale is not None:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_scale * channel_mean, min=0.0)
    draw = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    if isinstance(strength, torch.Tensor):
        strength = strength.to(noise.device, noise.dtype)
    return noise + strength * draw.to(noise.device, noise.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator) -> torch.Tensor:
    """``--multires_noise_iterations``: add noise drawn at ever smaller sizes (each level shrunk by a
    random 2..4 per level), upsampled bilinearly and weighted by ``discount**i``; then unit std."""
    b, c, height, width = noise.shape
    up = torch.nn.Upsample(size=(height, width), mode="bilinear")
    out = noise.float().clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=generator)) * 2 + 2
        h, w = max(1, int(height / r ** i)), max(1, int(width / r ** i))
        out = out + up(torch.randn((b, c, h, w), generator=generator)).to(out.device) * discount ** i
        if h == 1 or w == 1:
            break
    return (out / out.std()).to(noise.dtype)


def sample_timesteps(min_timestep: int, max_timestep: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [min, max); every one ``max`` when min >= max (kohya's rule)."""
    if min_timestep < max_timestep:
        return torch.randint(min_timestep, max_timestep, (batch,), generator=generator)
    return torch.full((batch,), max_timestep, dtype=torch.long)


# ---------------------------------------------------------------- the loss
def huber_threshold(schedule: str, huber_c: float, huber_scale: float, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """kohya's per-sample Huber ``c``: constant c*scale; exponential exp(-t*(-ln c)/T)*scale; or snr
    (1-c)/(1+sigma_t)^2 + c with sigma_t = sqrt((1-alpha_bar)/alpha_bar) (no scale, as in kohya)."""
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * timesteps.float()) * huber_scale
    if schedule == "snr":
        ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    if schedule == "constant":
        return torch.full((timesteps.shape[0],), huber_c * huber_scale, device=timesteps.device)
    raise ValueError(f"unknown huber_schedule {schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """kohya's ``conditional_loss`` without reduction: l2, l1, huber 2c(sqrt(d^2+c^2)-c), smooth_l1
    2(sqrt(d^2+c^2)-c), with ``huber_c`` one value per sample."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
        soft = torch.sqrt((pred - target) ** 2 + c ** 2) - c
        return 2 * c * soft if loss_type == "huber" else 2 * soft
    raise ValueError(f"unknown loss_type {loss_type!r}")


def apply_masked_loss(loss: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """kohya's ``apply_masked_loss``: the element-wise loss (B, C, h, w) times the (B, H, W) pixel masks
    shrunk to the latent size by area averaging; the caller's mean then divides by all elements, not by
    the mask's sum (kohya). No masks: the loss unchanged."""
    if masks is None:
        return loss
    mask = masks.to(device=loss.device, dtype=loss.dtype).unsqueeze(1)
    return loss * F.interpolate(mask, size=loss.shape[2:], mode="area")


# ---------------------------------------------------------------- per-sample weights (``snr`` = all_snr[t])
def min_snr_weight(loss: torch.Tensor, snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """``--min_snr_gamma``: min(snr, gamma)/snr, or min(snr, gamma)/(snr+1) for v-prediction."""
    clipped = torch.clamp(snr, max=gamma)
    return loss * (clipped / (snr + 1 if v_prediction else snr)).float().to(loss.device)


def snr_scale(snr: torch.Tensor) -> torch.Tensor:
    capped = torch.clamp(snr, max=SNR_CAP)
    return capped / (capped + 1)


def scale_v_like_noise(loss: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """``--scale_v_pred_loss_like_noise_pred``: times snr/(snr+1) (snr capped at 1000)."""
    return loss * snr_scale(snr).to(loss.device)


def add_v_like_loss(loss: torch.Tensor, snr: torch.Tensor, weight: float) -> torch.Tensor:
    """``--v_pred_like_loss``: plus loss/(snr/(snr+1)) * weight (snr capped at 1000)."""
    return loss + loss / snr_scale(snr).to(loss.device) * weight


def debiased_estimation(loss: torch.Tensor, snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """``--debiased_estimation_loss``: times 1/sqrt(snr), or 1/(snr+1) for v-prediction (snr capped at 1000)."""
    capped = torch.clamp(snr, max=SNR_CAP).to(loss.device)
    return loss * (1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped))
