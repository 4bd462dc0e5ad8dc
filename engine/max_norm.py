"""kohya sd-scripts' max-norm regularisation (``--scale_weight_norms``): ``apply_max_norm_regularization``
of ``networks.lora``, run after every optimizer step on the live LoRA weights."""

from __future__ import annotations

from typing import Iterable

import torch


def apply_max_norm(pairs: Iterable[tuple[torch.Tensor, torch.Tensor, float]], max_norm: float,
                   device) -> tuple[int, float, float]:
    """Scale each ``(down, up, alpha)`` module in place as kohya does; (modules scaled, mean, max norm).

    Per module, on ``device``: the update ``up @ down`` (a 3x3 conv's as the composed conv) times
    alpha/dim; its norm, clamped below at ``max_norm / 2``, gives ``ratio = min(norm, max_norm) / norm``,
    and where the ratio is not 1 both ``up`` and ``down`` are multiplied by ``sqrt(ratio)``. The mean and
    max are over the modules' norms after scaling, summed in the order given.
    """
    keys_scaled = 0
    norms: list[float] = []
    with torch.no_grad():
        for down_param, up_param, alpha in pairs:
            down, up = down_param.to(device), up_param.to(device)
            scale = torch.tensor(float(alpha), dtype=down.dtype, device=down.device) / down.shape[0]
            if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
                updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
            elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
                updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            else:
                updown = up @ down
            updown *= scale
            norm = updown.norm().clamp(min=max_norm / 2)
            desired = torch.clamp(norm, max=max_norm)
            ratio = desired.cpu() / norm.cpu()
            if ratio != 1:
                keys_scaled += 1
                sqrt_ratio = ratio ** 0.5
                up_param.mul_(sqrt_ratio.to(up_param.device))
                down_param.mul_(sqrt_ratio.to(down_param.device))
            norms.append((updown.norm().cpu() * ratio).item())
    if not norms:
        return 0, 0.0, 0.0
    return keys_scaled, sum(norms) / len(norms), max(norms)
