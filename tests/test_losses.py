"""kohya's loss and noise options: each function against kohya's formula written out with plain torch
ops, the rules kohya enforces between them, their metadata, and one short run with several on."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from engine.config import TrainConfig
from engine.train import losses

PRED = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]], [[[0.1, 0.2], [-0.3, 3.0]]]])
TARGET = torch.tensor([[[[0.0, 1.0], [1.5, 0.5]]], [[[0.1, -0.2], [0.3, 1.0]]]])


def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


# ----------------------------------------------------------------------------- element-wise losses
def test_l2_and_l1_are_squared_and_absolute_differences():
    assert torch.allclose(losses.elementwise_loss(PRED, TARGET, "l2"), (PRED - TARGET) ** 2)
    assert torch.allclose(losses.elementwise_loss(PRED, TARGET, "l1"), (PRED - TARGET).abs())


def test_huber_and_smooth_l1_use_one_c_per_sample():
    c = torch.tensor([0.1, 0.5])
    d2 = (PRED - TARGET) ** 2
    cb = c.view(2, 1, 1, 1)
    expected_huber = 2 * cb * (torch.sqrt(d2 + cb * cb) - cb)
    expected_smooth = 2 * (torch.sqrt(d2 + cb * cb) - cb)
    assert torch.allclose(losses.elementwise_loss(PRED, TARGET, "huber", c), expected_huber)
    assert torch.allclose(losses.elementwise_loss(PRED, TARGET, "smooth_l1", c), expected_smooth)
    # sample 0 and 1 really got different c
    assert not torch.allclose(losses.elementwise_loss(PRED, TARGET, "huber", torch.tensor([0.1, 0.1])),
                              expected_huber)


def test_huber_c_schedules_constant_exponential_and_snr():
    t = torch.tensor([0, 250, 999])
    ac = scheduler().alphas_cumprod
    constant = losses.huber_threshold("constant", 0.2, 1.5, t, ac)
    assert torch.allclose(constant, torch.full((3,), 0.3))
    exponential = losses.huber_threshold("exponential", 0.2, 1.5, t, ac)
    assert torch.allclose(exponential, torch.tensor([math.exp(math.log(0.2) * k / 1000) * 1.5 for k in (0, 250, 999)]))
    snr = losses.huber_threshold("snr", 0.2, 1.5, t, ac)
    expected = []
    for k in (0, 250, 999):
        a = float(ac[k])
        sigma = math.sqrt((1 - a) / a)
        expected.append((1 - 0.2) / (1 + sigma) ** 2 + 0.2)     # kohya does not scale the snr schedule
    assert torch.allclose(snr, torch.tensor(expected))


# ----------------------------------------------------------------------------- SNR weights
def all_snr():
    ac = scheduler().alphas_cumprod
    return ac / (1 - ac)


def test_min_snr_weight_divides_by_snr_or_by_snr_plus_one_for_v_prediction():
    snr = all_snr()[torch.tensor([10, 900])]
    loss = torch.tensor([1.0, 2.0])
    assert snr[0] > 5 > snr[1]
    eps = losses.min_snr_weight(loss, snr, 5.0, False)
    v = losses.min_snr_weight(loss, snr, 5.0, True)
    assert torch.allclose(eps, loss * torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert torch.allclose(v, loss * torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_v_prediction_scale_and_v_like_loss_cap_the_snr_at_1000():
    snr = all_snr()[torch.tensor([0, 500])]
    assert snr[0] > 1000
    loss = torch.tensor([0.4, 0.8])
    capped = torch.minimum(snr, torch.tensor(1000.0))
    scale = capped / (capped + 1)
    assert torch.allclose(losses.scale_v_like_noise(loss, snr), loss * scale)
    assert torch.allclose(losses.add_v_like_loss(loss, snr, 0.25), loss + loss / scale * 0.25)


def test_debiased_estimation_is_one_over_sqrt_snr_or_one_over_snr_plus_one():
    snr = all_snr()[torch.tensor([0, 500, 999])]
    loss = torch.tensor([1.0, 1.0, 1.0])
    capped = torch.minimum(snr, torch.tensor(1000.0))
    assert torch.allclose(losses.debiased_estimation(loss, snr, False), loss / torch.sqrt(capped))
    assert torch.allclose(losses.debiased_estimation(loss, snr, True), loss / (capped + 1))


def test_zero_terminal_snr_ends_the_schedule_at_zero_signal_and_keeps_the_first_step():
    sched = scheduler()
    before = sched.alphas_cumprod.clone()
    losses.apply_zero_terminal_snr(sched)
    root = before.sqrt()
    shifted = (root - root[-1]) * root[0] / (root[0] - root[-1])
    assert sched.alphas_cumprod[-1] == 0
    assert torch.allclose(sched.alphas_cumprod, shifted ** 2, atol=1e-6)
    assert torch.allclose(sched.alphas_cumprod[0], before[0])
    assert torch.allclose(sched.alphas, 1 - sched.betas)


# ----------------------------------------------------------------------------- noise
def test_noise_offset_with_adaptive_scale_grows_with_the_latent_channel_mean():
    latents = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 50 - 0.5
    noise = torch.zeros_like(latents)
    out = losses.offset_noise(latents, noise, 0.1, 0.05, torch.Generator().manual_seed(7))
    draw = torch.randn((2, 3, 1, 1), generator=torch.Generator().manual_seed(7))
    strength = torch.clamp(0.1 + 0.05 * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    assert torch.allclose(out, noise + strength * draw)
    plain = losses.offset_noise(latents, noise, 0.1, None, torch.Generator().manual_seed(7))
    assert torch.allclose(plain, noise + 0.1 * draw)


def test_multires_noise_adds_shrinking_upsampled_levels_then_unit_std():
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    out = losses.pyramid_noise(noise.clone(), 3, 0.3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    up = torch.nn.Upsample(size=(16, 16), mode="bilinear")
    expected = noise.clone()
    for i in range(3):
        r = float(torch.rand(1, generator=gen)) * 2 + 2
        side = max(1, int(16 / r ** i))
        expected = expected + up(torch.randn((1, 4, side, side), generator=gen)) * 0.3 ** i
    expected = expected / expected.std()
    assert torch.allclose(out, expected, atol=1e-6)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-5)


def test_timesteps_stay_in_the_range_and_one_timestep_when_min_equals_max():
    t = losses.sample_timesteps(200, 300, 500, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 200 and int(t.max()) < 300 and t.unique().numel() > 50
    assert torch.equal(losses.sample_timesteps(400, 400, 3, torch.Generator()), torch.tensor([400, 400, 400]))


# ----------------------------------------------------------------------------- kohya's rules
@pytest.mark.parametrize("values, field, message", [
    ({"adaptive_noise_scale": 0.1}, "adaptive_noise_scale", "needs --noise_offset"),
    ({"scale_v_pred_loss_like_noise_pred": True}, "scale_v_pred_loss_like_noise_pred", "needs --v_parameterization"),
    ({"v_pred_like_loss": 0.2, "v_parameterization": True}, "v_pred_like_loss", "cannot be combined"),
    ({"max_timestep": 1200}, "max_timestep", "must be ≤ 1000"),
    ({"min_timestep": 600, "max_timestep": 500}, "min_timestep", "must be ≤ max_timestep (500)"),
    ({"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.0}, "huber_c", "must be > 0"),
    ({"loss_type": "mse"}, "loss_type", "must be one of l2, l1, huber, smooth_l1"),
])
def test_loss_option_combinations_kohya_refuses_are_one_line_naming_the_field(values, field, message):
    problems = TrainConfig(**values).problems()
    assert message in problems[field]


def test_zero_terminal_snr_without_v_parameterization_warns_as_kohya_does():
    from engine.plan import loss_warnings

    assert loss_warnings(TrainConfig(zero_terminal_snr=True))[0].startswith("--zero_terminal_snr is enabled, but")
    assert loss_warnings(TrainConfig(zero_terminal_snr=True, v_parameterization=True)) == []


def test_loss_options_are_config_fields_not_pending_flags():
    from engine.cli_args import make_parser, parse_train_args

    argv = ["--loss_type=huber", "--huber_schedule=constant", "--multires_noise_iterations=6", "--min_timestep=100",
            "--ip_noise_gamma=0.1", "--v_parameterization", "--debiased_estimation_loss"]
    cfg = parse_train_args(make_parser("spyke-cockpit train", "test"), argv)[1]
    assert (cfg.loss_type, cfg.huber_schedule, cfg.multires_noise_iterations, cfg.min_timestep) == (
        "huber", "constant", 6, 100)
    assert cfg.ip_noise_gamma == 0.1 and cfg.v_parameterization and cfg.debiased_estimation_loss


def test_metadata_records_kohyas_loss_keys_and_v_prediction():
    from engine.kohya.metadata import build_metadata, loss_metadata

    cfg = TrainConfig(loss_type="smooth_l1", multires_noise_iterations=6, v_parameterization=True,
                      debiased_estimation_loss=True, max_timestep=900)
    meta = build_metadata(loss_metadata(cfg))
    assert {k: meta[k] for k in ("ss_loss_type", "ss_huber_c", "ss_huber_schedule", "ss_multires_noise_iterations",
                                 "ss_multires_noise_discount", "ss_debiased_estimation", "ss_zero_terminal_snr",
                                 "ss_adaptive_noise_scale", "ss_ip_noise_gamma")} == {
        "ss_loss_type": "smooth_l1", "ss_huber_c": "0.1", "ss_huber_schedule": "snr",
        "ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.3", "ss_debiased_estimation": "True",
        "ss_zero_terminal_snr": "False", "ss_adaptive_noise_scale": "None", "ss_ip_noise_gamma": "None"}
    assert meta["ss_base_model_version"] == "sd_v1_v" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.timestep_range"] == "0,900"
    plain = build_metadata(loss_metadata(TrainConfig()))
    assert plain["ss_base_model_version"] == "sd_v1" and plain["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.timestep_range" not in plain


# ----------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_cache):
    from engine.tiny import generate_dataset

    small = generate_dataset(tmp_path_factory.mktemp("small"), num_images=4, num_repeats=1, resolution=64, seed=3)
    return {"root": tiny_cache, "small": small}


def run(assets, out, **overrides):
    from engine.demo import prepare_demo
    from engine.trainer import Trainer

    values = dict(dataset_config=str(assets["small"].dataset_toml), resolution="64", max_train_epochs=None,
                  max_train_steps=3, save_every_n_steps=None, save_state=False, output_name="loss_run",
                  network_dim=4, network_alpha=2.0, seed=11)
    values.update(overrides)
    result = Trainer(prepare_demo(root=assets["root"], output_root=out, **values), sinks=[]).run()
    assert result.status == "completed"
    return result.losses


def test_default_loss_options_train_exactly_as_explicit_kohya_defaults_and_options_change_the_run(assets, tmp_path):
    default = run(assets, tmp_path / "default")
    explicit = run(assets, tmp_path / "explicit", loss_type="l2", min_timestep=0, max_timestep=1000,
                   huber_c=0.1, multires_noise_discount=0.3)
    assert default == explicit
    several = run(assets, tmp_path / "several", loss_type="huber", huber_schedule="snr", min_timestep=100,
                  max_timestep=900, multires_noise_iterations=4, noise_offset=0.05, noise_offset_random_strength=True,
                  adaptive_noise_scale=0.01, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                  debiased_estimation_loss=True, zero_terminal_snr=True, v_parameterization=True,
                  scale_v_pred_loss_like_noise_pred=True, min_snr_gamma=5.0)
    assert len(several) == 3 and all(math.isfinite(x) for x in several)
    assert several != default


# ----------------------------------------------------------------------------- TrainStep.loss wiring
class _Unet:
    def __init__(self, pred):
        self.pred, self.seen = pred, {}

    def __call__(self, noisy, timesteps, hidden):
        from types import SimpleNamespace

        self.seen.update(noisy=noisy.clone(), t=timesteps.clone())
        return SimpleNamespace(sample=self.pred)


def _step(latents, pred, **cfg):
    """A TrainStep on fixed latents and a fixed prediction (no model), its noise generator at seed 3."""
    import contextlib
    from types import SimpleNamespace

    from engine.train.step import TrainStep

    unet = _Unet(pred)
    models = SimpleNamespace(device=torch.device("cpu"), unet=unet,
                             accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    step = TrainStep(TrainConfig(**cfg), models, plan=None, seed=3)
    step.batch_latents = lambda batch: latents
    step.encode_prompts = lambda captions: None
    batch = SimpleNamespace(captions=["a", "b"], is_reg=torch.tensor([False, False]))
    return step, unet, batch


def test_v_parameterization_targets_the_velocity_and_ip_noise_only_perturbs_the_input():
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    pred = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    step, unet, batch = _step(latents, pred, v_parameterization=True, ip_noise_gamma=0.1)
    loss = float(step.loss(batch))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn((2, 4, 8, 8), generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    extra = torch.randn((2, 4, 8, 8), generator=gen)
    ac = scheduler().alphas_cumprod[t].view(2, 1, 1, 1)
    velocity = ac.sqrt() * noise - (1 - ac).sqrt() * latents
    assert torch.equal(unet.seen["t"], t)
    assert torch.allclose(unet.seen["noisy"], ac.sqrt() * latents + (1 - ac).sqrt() * (noise + 0.1 * extra), atol=1e-5)
    assert loss == pytest.approx(float(((pred - velocity) ** 2).mean()), rel=1e-5)


def test_zero_terminal_snr_noises_with_the_new_schedule_but_weights_by_the_old_snr_as_kohya():
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    pred = torch.zeros((2, 4, 8, 8))
    step, unet, batch = _step(latents, pred, zero_terminal_snr=True, debiased_estimation_loss=True, loss_type="l1",
                              min_timestep=900, max_timestep=990)
    loss = float(step.loss(batch))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn((2, 4, 8, 8), generator=gen)
    t = torch.randint(900, 990, (2,), generator=gen)
    fixed = scheduler()
    losses.apply_zero_terminal_snr(fixed)
    ac = fixed.alphas_cumprod[t].view(2, 1, 1, 1)
    assert torch.allclose(unet.seen["noisy"], ac.sqrt() * latents + (1 - ac).sqrt() * noise, atol=1e-5)
    snr = all_snr()[t]                              # the schedule before the rescale
    per_sample = (pred - noise).abs().mean(dim=[1, 2, 3]) / torch.sqrt(snr)
    assert not torch.allclose(snr, fixed.alphas_cumprod[t] / (1 - fixed.alphas_cumprod[t]), rtol=0.1)
    assert loss == pytest.approx(float(per_sample.mean()), rel=1e-5)
