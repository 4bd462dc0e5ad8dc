"""The combinations of kohya's loss and noise options that kohya refuses (light: no torch)."""

from __future__ import annotations

from typing import Any

TIMESTEPS = 1000     # SD1's training timesteps


def loss_problems(cfg: Any) -> dict[str, str]:
    """field -> one-line reason, for kohya's loss/noise option rules (``verify_training_args``)."""
    out: dict[str, str] = {}
    if cfg.adaptive_noise_scale is not None and not cfg.noise_offset:
        out["adaptive_noise_scale"] = "needs --noise_offset, as in kohya (give both, or remove it)"
    if cfg.scale_v_pred_loss_like_noise_pred and not cfg.v_parameterization:
        out["scale_v_pred_loss_like_noise_pred"] = "needs --v_parameterization, as in kohya"
    if cfg.v_pred_like_loss and cfg.v_parameterization:
        out["v_pred_like_loss"] = "cannot be combined with --v_parameterization, as in kohya"
    low = 0 if cfg.min_timestep is None else cfg.min_timestep
    high = TIMESTEPS if cfg.max_timestep is None else cfg.max_timestep
    if high > TIMESTEPS:
        out["max_timestep"] = f"must be ≤ {TIMESTEPS} (got {high})"
    elif low > high:
        out["min_timestep"] = f"must be ≤ max_timestep ({high}) (got {low})"
    elif low == high == TIMESTEPS:
        out["min_timestep"] = f"equal to max_timestep trains the single timestep {high}, which must be ≤ {TIMESTEPS - 1}"
    if cfg.loss_type in ("huber", "smooth_l1") and cfg.huber_schedule == "exponential" and not cfg.huber_c > 0:
        out["huber_c"] = f"must be > 0 with --huber_schedule=exponential (got {cfg.huber_c!r})"
    return out
