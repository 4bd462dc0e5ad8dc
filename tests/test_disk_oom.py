"""When the disk or memory runs out: the plan-time disk estimate, the free-space check before each
save (pause in the cockpit, stop resumable headless), and out-of-memory stops that resume exactly.

Runs are tiny_model 6-step runs from tests/test_durable.py (a checkpoint + state every 2 steps)."""

from __future__ import annotations

import errno
import io
import json
import re
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from engine.events import LogMessage, PhaseChanged, StepCompleted
from tests.test_durable import N_STEPS, assets, make_config, max_abs_diff, read_tensors, straight, train  # noqa: F401

Usage = namedtuple("Usage", "total used free")
ROOMY = 10**12
TIGHT = 1024  # less than the free-space margin: nothing fits


class FakeDisk:
    """``shutil.disk_usage`` in the saver's guard: roomy until armed, then ``tight`` for ``calls`` calls."""

    def __init__(self, monkeypatch, calls: int | None = None) -> None:
        import engine.train.disk_guard as guard

        self.armed, self.calls, self.seen = False, calls, 0
        monkeypatch.setattr(guard.shutil, "disk_usage", self)

    def __call__(self, path):
        if self.armed and (self.calls is None or self.seen < self.calls):
            self.seen += 1
            return Usage(ROOMY, ROOMY - TIGHT, TIGHT)
        return Usage(ROOMY, 0, ROOMY)


def arm_at(disk: FakeDisk, step: int):
    def hook(s, loss):
        if s == step:
            disk.armed = True
        return loss
    return hook


def losses_after(run, step: int) -> dict[int, float]:
    return {e.step: e.loss for e in run.steps if e.step > step}


def assert_resumes_like_straight(assets, out: Path, state: Path, straight, from_step: int) -> None:
    resumed = train(make_config(assets, out, resume=str(state)))
    assert resumed.result.status == "completed", resumed.result.error
    ref = {e.step: e.loss for e in straight.steps}
    got = {e.step: e.loss for e in resumed.steps}
    assert sorted(got) == list(range(from_step + 1, N_STEPS + 1))
    assert all(got[s] == ref[s] for s in got), (got, ref)
    assert max_abs_diff(read_tensors(straight.result.final_path), read_tensors(resumed.result.final_path)) <= 1e-6


# --------------------------------------------------------------------------- the plan-time estimate
def test_lora_size_from_the_shipped_sd15_configs_is_kohyas_192_plus_72_modules():
    from engine.disk_budget import checkpoint_bytes, lora_size
    from engine.models import DEFAULT_SD15_CONFIG_DIR
    from engine.config import TrainConfig

    cfg = TrainConfig(pretrained_model_name_or_path=str(DEFAULT_SD15_CONFIG_DIR / "missing.safetensors"),
                      network_dim=32)
    size = lora_size(cfg)
    assert size.modules == 192 + 72
    # 589,824 parameters per unit of rank (+ an alpha per module): the well-known 37.7 MB fp16 file at dim 32.
    assert size.params == 589_824 * 32 + 264
    assert 37.7e6 < checkpoint_bytes(size, "fp16") < 38.0e6   # + headers and room for the metadata
    assert lora_size(cfg.replace(network_train_unet_only=True)).modules == 192


def test_lora_size_estimate_equals_the_trained_files_parameter_count(assets, straight):
    from engine.disk_budget import lora_size

    cfg = make_config(assets, Path(straight.result.final_path).parent)
    tensors = read_tensors(straight.result.final_path)
    size = lora_size(cfg)
    assert size.params == sum(t.numel() for t in tensors.values())
    assert size.modules * 3 == len(tensors)


def test_plan_warns_when_the_runs_files_will_not_fit_in_the_output_folder(assets, tmp_path, monkeypatch):
    import engine.plan as plan_mod
    from engine.plan import plan_run

    cfg = make_config(assets, tmp_path / "out")
    assert not [w for w in plan_run(cfg).warnings if "will write about" in w]
    monkeypatch.setattr(plan_mod.shutil, "disk_usage", lambda p: Usage(ROOMY, ROOMY - TIGHT, TIGHT))
    plan = plan_run(cfg)
    (warning,) = [w for w in plan.warnings if "will write about" in w]
    assert warning.startswith(f"--output_dir={cfg.output_dir}: the run will write about ")
    assert "4 checkpoints x " in warning and "4 states x " in warning and "but only 1.0 KiB is free" in warning
    assert plan.disk.total == 4 * plan.disk.checkpoint_bytes + 4 * plan.disk.state_bytes


# --------------------------------------------------------------------------- disk full at a save
def test_headless_disk_full_before_a_save_writes_the_state_first_and_stops_resumable(
        assets, straight, tmp_path, monkeypatch):
    disk = FakeDisk(monkeypatch, calls=1)   # the checkpoint + state do not fit; the state alone does
    out = tmp_path / "out"
    run = train(make_config(assets, out), loss_hook=arm_at(disk, 4))
    assert run.result.status == "failed"
    err = run.finished.error
    assert err.startswith("disk full: not writing spyke_demo-step00000004.safetensors and its training state")
    state = out / "spyke_demo-step00000004-state"
    assert f"training state saved to {state}" in err and state.is_dir()
    assert not (out / "spyke_demo-step00000004.safetensors").exists()
    assert (out / "spyke_demo-step00000002.safetensors").is_file()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert str(state) in run.finished.resume_hint
    assert_resumes_like_straight(assets, out, state, straight, 4)


def test_headless_disk_full_with_no_room_for_a_state_keeps_the_earlier_state_as_the_resume_point(
        assets, tmp_path, monkeypatch):
    disk = FakeDisk(monkeypatch)
    out = tmp_path / "out"
    run = train(make_config(assets, out), loss_hook=arm_at(disk, 4))
    assert run.result.status == "failed"
    assert run.finished.error.endswith("; no room for a training state either")
    assert not (out / "spyke_demo-step00000004-state").exists()
    assert str(out / "spyke_demo-step00000002-state") in run.finished.resume_hint


def test_a_real_enospc_during_the_checkpoint_write_leaves_no_partial_file_and_stops_resumable(
        assets, straight, tmp_path, monkeypatch):
    import engine.checkpoint as checkpoint
    import engine.io.atomic as atomic

    fail = {"armed": False}

    def write_file(path, data, **kw):
        if fail["armed"] and Path(path).suffix == ".safetensors":
            fail["armed"] = False
            return atomic.write_file(path, data[: len(data) // 2], check=_enospc, **{k: v for k, v in kw.items()
                                                                                    if k != "check"})
        return atomic.write_file(path, data, **kw)

    def _enospc(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_file", write_file)

    def hook(step, loss):
        fail["armed"] = fail["armed"] or step == 4
        return loss

    out = tmp_path / "out"
    run = train(make_config(assets, out), loss_hook=hook)
    assert run.result.status == "failed"
    err = run.finished.error
    ckpt = out / "spyke_demo-step00000004.safetensors"
    assert err.startswith(f"could not save {ckpt}: No space left on device; free disk space")
    state = out / "spyke_demo-step00000004-state"
    assert err.endswith(f"; training state saved to {state}")
    assert not ckpt.exists() and not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert state.is_dir() and str(state) in run.finished.resume_hint


def test_cockpit_disk_full_pauses_and_retries_the_save_after_resume(assets, tmp_path, monkeypatch):
    from engine.control import TrainingControl
    from engine.trainer import Trainer

    disk = FakeDisk(monkeypatch)
    control = TrainingControl()
    events: list = []

    def sink(event):
        events.append(event)
        if isinstance(event, PhaseChanged) and event.phase == "paused":
            disk.armed = False               # the user freed space, then pressed space
            control.resume()

    out = tmp_path / "out"
    result = Trainer(make_config(assets, out), control=control, sinks=[sink], loss_hook=arm_at(disk, 4),
                     on_disk_full="pause").run()
    assert result.status == "completed", result.error
    errors = [e.message for e in events if isinstance(e, LogMessage) and e.level == "error"]
    assert len(errors) == 1 and errors[0].startswith("disk full: not writing spyke_demo-step00000004")
    assert errors[0].endswith("paused: free space, then press space to retry the save")
    paused = [e for e in events if isinstance(e, PhaseChanged) and e.phase == "paused"]
    assert [p.detail for p in paused] == ["disk full"]
    assert (out / "spyke_demo-step00000004.safetensors").is_file()
    assert [e.step for e in events if isinstance(e, StepCompleted)] == list(range(1, N_STEPS + 1))


def test_a_run_started_for_the_cockpit_pauses_on_disk_full_and_a_headless_one_stops(tmp_path):
    from engine.config import TrainConfig
    from engine.session import start_training
    from engine.trainer import Trainer

    handle = start_training(TrainConfig(output_dir=str(tmp_path / "out")))   # invalid: it ends at once
    assert handle.wait(60) and handle.result.status == "failed"
    assert handle.trainer.on_disk_full == "pause"
    assert Trainer(TrainConfig()).on_disk_full == "stop"


# --------------------------------------------------------------------------- out of memory
OOMS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                           "capacity of 8 GiB"),
    "mps": lambda: RuntimeError("MPS backend out of memory (MPS allocated: 17.5 GB, other allocations: 1.2 GB, "
                                "max allowed: 18.1 GB). Tried to allocate 256 MB on private pool."),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 4294967296 bytes. Error code 12"),
}


def oom_at(step: int, kind: str):
    def hook(s, loss):
        if s == step:
            raise OOMS[kind]()
        return loss
    return hook


def run_budget(monkeypatch, in_run: int) -> None:
    """The memory a run could use, as the out-of-memory stop reads it (the pre-flight's is left real)."""
    from engine.fit import preflight
    from engine.fit.device_memory import DeviceMemory

    real = preflight.device_memory
    monkeypatch.setattr(preflight, "device_memory", lambda device, in_use=False: DeviceMemory(
        "cpu", in_run, 10**11, "usable RAM") if in_use else real(device))


def checkpointing_peak(config) -> int:
    """The estimated peak of ``config`` with --gradient_checkpointing: the budget the runs below fake."""
    from engine.plan import plan_run

    return plan_run(config.replace(gradient_checkpointing=True, ignore_memory_check=True)).memory.estimate.peak_bytes


@pytest.fixture(scope="module")
def oom_runs(assets, tmp_path_factory):
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        for kind in OOMS:
            out = tmp_path_factory.mktemp(f"oom_{kind}") / "out"
            config = make_config(assets, out)
            budget = checkpointing_peak(config)
            run_budget(mp, budget)
            runs[kind] = (out, train(config, loss_hook=oom_at(4, kind)), budget)
    return runs


@pytest.mark.parametrize("kind", list(OOMS))
def test_out_of_memory_in_a_step_stops_with_the_last_completed_steps_state_and_the_settings_that_fit(
        oom_runs, kind):
    from engine.fit.advice import size

    out, run, budget = oom_runs[kind]
    assert run.result.status == "failed" and run.result.global_step == 3
    err = run.finished.error
    state = out / "spyke_demo-step00000003-state"
    assert err.startswith("out of memory at step 4/6 (")
    assert "peak RSS " in err and " on cpu)" in err
    assert f"; state of step 3 saved to {state}; to fit in {size(budget)} usable RAM: " in err
    fits = run.finished.fits
    assert fits and err.endswith(", ".join(fits))                 # the line names what the cockpit offers
    assert any(f.startswith("--gradient_checkpointing (est. peak ") for f in fits)
    assert not [f for f in fits if "--train_batch_size" in f or "--resolution" in f]   # the dataset TOML sets both
    assert state.is_dir() and str(state) in run.finished.resume_hint
    assert json.loads((state / "progress.json").read_text())["global_step"] == 3
    assert "\n" not in err


def test_the_printed_resume_command_after_out_of_memory_resumes_bit_exact_with_the_straight_run(
        assets, oom_runs, straight):
    import shlex

    from cockpit.cli import train_parser
    from engine.cli_args import parse_train_args

    out, run, _ = oom_runs["cuda"]
    args = shlex.split(run.finished.resume_hint)
    assert args[:3] == ["spyke-cockpit", "train", "--headless"] and Path(args[3]).is_file()
    ns, config = parse_train_args(train_parser(), args[2:])           # as the command line reads it
    assert ns.headless and Path(config.resume) == out / "spyke_demo-step00000003-state"
    resumed = train(config.validate())
    assert resumed.result.status == "completed", resumed.result.error
    ref = {e.step: e.loss for e in straight.steps}
    assert {e.step: e.loss for e in resumed.steps} == {s: ref[s] for s in range(4, N_STEPS + 1)}
    assert max_abs_diff(read_tensors(straight.result.final_path), read_tensors(resumed.result.final_path)) <= 1e-6


def oom_inside_the_checkpoint_write(monkeypatch, kind: str, name: str) -> None:
    """Raise ``kind``'s out-of-memory error inside the atomic write of ``name``, half of it on disk."""
    import engine.checkpoint as checkpoint
    import engine.io.atomic as atomic

    def raise_oom(tmp):
        assert tmp.is_file() and ".tmp-" in tmp.name       # the partial file is there when it fails
        raise OOMS[kind]()

    def write_file(path, data, **kw):
        if Path(path).name == name:
            return atomic.write_file(path, data[: len(data) // 2], check=raise_oom)
        return atomic.write_file(path, data, **kw)

    monkeypatch.setattr(checkpoint, "write_file", write_file)


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_out_of_memory_inside_a_checkpoint_write_removes_the_partial_file_and_saves_the_completed_steps_state(
        assets, straight, tmp_path, monkeypatch, kind):
    out = tmp_path / "out"
    oom_inside_the_checkpoint_write(monkeypatch, kind, "spyke_demo-step00000004.safetensors")
    run = train(make_config(assets, out))
    assert run.result.status == "failed" and run.result.global_step == 4
    phrase = {"cuda": "CUDA out of memory", "mps": "MPS backend out of memory"}[kind]
    state = out / "spyke_demo-step00000004-state"
    assert run.finished.error.startswith(f"out of memory at the save after step 4 ({phrase}; ")
    assert f"; state of step 4 saved to {state}" in run.finished.error
    assert not (out / "spyke_demo-step00000004.safetensors").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    earlier = out / "spyke_demo-step00000002.safetensors"           # intact: the straight run's step-2 weights
    assert max_abs_diff(read_tensors(earlier), read_tensors(Path(straight.result.final_path).parent /
                                                            earlier.name)) == 0
    assert (out / "spyke_demo-step00000002-state").is_dir() and state.is_dir()
    assert json.loads((state / "progress.json").read_text())["global_step"] == 4
    if kind == "cuda":
        assert_resumes_like_straight(assets, out, state, straight, 4)


def test_out_of_memory_in_the_validation_after_a_step_is_named_as_such_and_keeps_that_steps_state(
        assets, tmp_path, monkeypatch):
    from engine.train.step import TrainStep

    real = TrainStep.loss

    def loss(self, batch):
        if self.fixed_timestep is not None:           # only inside a validation pass
            raise OOMS["cuda"]()
        return real(self, batch)

    monkeypatch.setattr(TrainStep, "loss", loss)
    out = tmp_path / "out"
    run = train(make_config(assets, out, validation_split=0.25, validate_every_n_steps=2))
    assert run.result.status == "failed" and run.result.global_step == 2
    state = out / "spyke_demo-step00000002-state"
    assert run.finished.error.startswith("out of memory at the validation after step 2 (CUDA out of memory; ")
    assert f"; last state: {state}" in run.finished.error and str(state) in run.finished.resume_hint


def test_headless_out_of_memory_exits_1_and_prints_the_line_and_the_resume_command(assets, tmp_path, monkeypatch):
    import engine.trainer as trainer_mod
    from engine.headless import run_headless

    real = trainer_mod.Trainer
    monkeypatch.setattr(trainer_mod, "Trainer", lambda *a, **kw: real(*a, loss_hook=oom_at(2, "cpu"), **kw))
    out = io.StringIO()
    code = run_headless(make_config(assets, tmp_path / "out", no_notify=True), out=out)
    text = out.getvalue()
    assert code == 1
    assert "out of memory at step 2/6 (DefaultCPUAllocator: can't allocate memory; peak RSS " in text
    run_id = re.search(r"^run (\S+):", text, re.M).group(1)
    config = tmp_path / "out" / ".spyke" / run_id / "config.toml"
    assert (f"\nto resume: spyke-cockpit train --headless {config} --resume "
            f"{tmp_path / 'out' / 'spyke_demo-step00000001-state'}\n") in text


def test_headless_disk_full_prints_the_resume_command_of_the_state_it_wrote(assets, tmp_path, monkeypatch):
    import engine.trainer as trainer_mod
    from engine.headless import run_headless

    disk = FakeDisk(monkeypatch, calls=1)
    real = trainer_mod.Trainer
    monkeypatch.setattr(trainer_mod, "Trainer", lambda *a, **kw: real(*a, loss_hook=arm_at(disk, 4), **kw))
    out = io.StringIO()
    assert run_headless(make_config(assets, tmp_path / "out", no_notify=True), out=out) == 1
    text = out.getvalue()
    run_id = re.search(r"^run (\S+):", text, re.M).group(1)
    assert "error: disk full: not writing spyke_demo-step00000004.safetensors" in text
    assert (f"\nto resume: spyke-cockpit train --headless {tmp_path / 'out' / '.spyke' / run_id / 'config.toml'} "
            f"--resume {tmp_path / 'out' / 'spyke_demo-step00000004-state'}\n") in text


def test_the_failed_screen_shows_the_out_of_memory_line_and_the_resume_command(oom_runs):
    from cockpit.state import CockpitState, reduce_all, resume_command

    _, run, _ = oom_runs["mps"]
    state = reduce_all(CockpitState(), run.events)
    assert state.status == "failed"
    assert state.error == run.finished.error and state.error.startswith("out of memory at step 4/6 (MPS backend")
    assert state.fits == tuple(run.finished.fits)
    assert resume_command(state) == run.finished.resume_hint       # the state the stop saved, not an older one


def test_out_of_memory_errors_are_recognised_and_others_are_not():
    from engine.train.oom import is_oom

    assert all(is_oom(make()) for make in OOMS.values())
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))
