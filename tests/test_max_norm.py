"""kohya's --scale_weight_norms: the per-module norm and scaling of apply_max_norm_regularization, a run
whose norms are capped (step events, TensorBoard tags), and exact resume with it on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.events import StepCompleted
from engine.lora import apply_lora
from engine.network_args import parse_network_args
from engine.run.journal import parse_line, step_loss
from engine.trackers import KohyaScalars
from tests.test_durable import ABORT_AT, N_STEPS, assets, make_config, max_abs_diff, read_tensors, train  # noqa: F401
from tests.test_network_args import load, randomize

DIM, ALPHA = 4, 2.0


def kohya_norm(down: torch.Tensor, up: torch.Tensor, alpha: float) -> float:
    """‖ΔW‖ · alpha/dim, with ΔW composed by hand (a 3x3 conv: ΔW[o,i,h,w] = Σ_r up[o,r] down[r,i,h,w])."""
    if down.dim() == 4 and down.shape[2:] == (3, 3):
        delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return float(delta.double().norm()) * alpha / down.shape[0]


def test_apply_max_norm_scales_the_modules_above_the_cap_by_the_root_of_kohyas_ratio(tiny_cache):
    unet, te = load(tiny_cache)
    net = apply_lora(unet, te, dim=DIM, alpha=ALPHA,
                     network_args=parse_network_args(["conv_dim=2", "conv_alpha=1"]))
    randomize(net)
    before = {m.kohya_name: (m.down.detach().clone(), m.up.detach().clone(), m.alpha) for m in net.modules}
    norms = {name: kohya_norm(d, u, a) for name, (d, u, a) in before.items()}
    assert any(d.shape[2:] == (3, 3) for d, _, _ in before.values())
    cap = sorted(norms.values())[len(norms) // 2]            # about half the modules are above it

    keys_scaled, mean_norm, max_norm = net.apply_max_norm(cap, torch.device("cpu"))

    above = {name for name, n in norms.items() if n > cap}
    assert keys_scaled == len(above) and 0 < keys_scaled < len(norms)
    capped = [min(n, cap) for n in norms.values()]
    assert math.isclose(mean_norm, sum(capped) / len(capped), rel_tol=1e-5)
    assert math.isclose(max_norm, cap, rel_tol=1e-5)
    for m in net.modules:
        down, up, alpha = before[m.kohya_name]
        factor = math.sqrt(cap / norms[m.kohya_name]) if m.kohya_name in above else 1.0
        assert torch.allclose(m.down, down * factor, rtol=1e-5, atol=1e-7), m.kohya_name
        assert torch.allclose(m.up, up * factor, rtol=1e-5, atol=1e-7), m.kohya_name
        assert kohya_norm(m.down.detach(), m.up.detach(), alpha) <= cap * (1 + 1e-5)


def test_step_events_carry_the_norms_only_when_asked_and_become_kohyas_tensorboard_tags():
    plain = StepCompleted(step=3, epoch=1, loss=0.5, lrs={"unet": 1e-4}, step_seconds=0.1)
    capped = StepCompleted(step=3, epoch=1, loss=0.5, lrs={"unet": 1e-4}, step_seconds=0.1, keys_scaled=7,
                           avg_key_norm=0.25, max_key_norm=1.0)
    assert "keys_scaled" not in plain.to_json()
    for event in (plain, capped):
        back = parse_line(event.to_json())
        assert back == event and step_loss(event.to_json().encode()) == (3, 0.5)
    scalars = KohyaScalars()
    ((logs, *_),) = scalars.records(capped)[:1]
    assert (logs["max_norm/keys_scaled"], logs["norm/avg_key_norm"], logs["max_norm/max_key_norm"]) == (7, 0.25, 1.0)
    ((logs, *_),) = scalars.records(plain)[:1]
    assert not any(tag.startswith(("max_norm/", "norm/")) for tag in logs)


CAPPED = dict(scale_weight_norms=0.02, learning_rate=1e-2, unet_lr=1e-2, text_encoder_lr=1e-2)


def test_a_run_with_scale_weight_norms_caps_every_module_and_resumes_exactly(assets, tmp_path):  # noqa: F811
    straight = train(make_config(assets, tmp_path / "straight" / "out", **CAPPED))
    assert straight.result.status == "completed", straight.result.error
    assert all(e.keys_scaled > 0 and e.avg_key_norm <= e.max_key_norm <= 0.02 * (1 + 1e-5) for e in straight.steps)
    tensors = read_tensors(straight.result.final_path)
    names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_down.weight")}
    for name in names:
        norm = kohya_norm(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                          float(tensors[f"{name}.alpha"]))
        assert norm <= 0.02 * (1 + 1e-5), name

    aborted = train(make_config(assets, tmp_path / "resumed" / "out", **CAPPED), abort_at=ABORT_AT)
    out = Path(aborted.result.final_path).parent
    resumed = train(make_config(assets, out, resume=str(out / f"spyke_demo-step{ABORT_AT:08d}-state"), **CAPPED))
    assert resumed.result.status == "completed", resumed.result.error
    ref = {e.step: (e.loss, e.keys_scaled, e.avg_key_norm) for e in straight.steps}
    got = {e.step: (e.loss, e.keys_scaled, e.avg_key_norm) for e in aborted.steps + resumed.steps}
    assert got == ref and len(ref) == N_STEPS
    assert max_abs_diff(tensors, read_tensors(resumed.result.final_path)) <= 1e-6


@pytest.mark.parametrize("where", ["cli", "preset", "config_file"])
def test_scale_weight_norms_is_kohyas_float_flag_everywhere(tmp_path, where):
    from engine.cli_args import make_parser, parse_train_args
    from engine.config_io import build_config

    parser = make_parser("spyke-cockpit train", "test")
    if where == "cli":
        cfg = parse_train_args(parser, ["--scale_weight_norms", "1"], notes=[])[1]
    else:
        toml = tmp_path / "c.toml"
        toml.write_text("[training]\nscale_weight_norms = 1\n" if where == "config_file" else
                        "[network]\nscale_weight_norms = 1\n")
        cfg = (parse_train_args(parser, [f"--config_file={toml}"], notes=[])[1] if where == "config_file"
               else build_config(toml))
    assert cfg.scale_weight_norms == 1.0 and isinstance(cfg.scale_weight_norms, float)
