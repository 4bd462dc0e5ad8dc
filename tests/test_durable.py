"""Durable runs: exact resume, the NaN guard, write faults, verified saves.

Every run here trains the tiny offline model on a 4-image 64 px dataset (4 batches per
epoch), so a 6-step run crosses an epoch boundary. The subprocess tests (SIGKILL at
random moments, SIGINT of the headless CLI) are in tests/test_kill.py.
"""

from __future__ import annotations

import errno
import math
import os
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.control import TrainingControl
from engine.errors import ConfigError
from engine.events import CheckpointSaved, LogMessage, RunFinished, RunStarted, StepCompleted

N_STEPS = 6
ABORT_AT = 3


# --------------------------------------------------------------------------- helpers
@dataclass
class Assets:
    root: Path          # prepare_demo cache: tiny-sd15/ (+ demo-dataset/)
    dataset_toml: Path  # 4 images x 1 repeat, 64 px


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from engine.tiny import build_tiny_model, generate_dataset

    root = tmp_path_factory.mktemp("durable_assets")
    build_tiny_model(root / "tiny-sd15")
    ds = generate_dataset(root / "small-dataset", num_images=4, num_repeats=1, resolution=64)
    return Assets(root, ds.dataset_toml)


def make_config(assets: Assets, out_dir: Path, **overrides):
    """A valid tiny config: 6 steps over 2 epochs, a checkpoint + state every 2 steps, fixed seed."""
    from engine.demo import prepare_demo

    values = dict(dataset_config=str(assets.dataset_toml), resolution="64", max_train_steps=N_STEPS,
                  max_train_epochs=None, save_every_n_steps=2, save_state=True, gradient_checkpointing=False,
                  seed=42, output_dir=str(out_dir))
    values.update(overrides)
    return prepare_demo(assets.root, out_dir.parent, **values).validate()


@dataclass
class Run:
    result: object
    events: list

    def of(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]

    @property
    def steps(self) -> list[StepCompleted]:
        return self.of(StepCompleted)

    @property
    def finished(self) -> RunFinished:
        (fin,) = self.of(RunFinished)
        return fin


def train(config, *, abort_at: int | None = None, loss_hook=None) -> Run:
    from engine.trainer import Trainer

    events: list = []
    control = TrainingControl()

    def sink(event) -> None:
        events.append(event)
        if abort_at is not None and isinstance(event, StepCompleted) and event.step == abort_at:
            control.abort(save=True)

    result = Trainer(config, control=control, sinks=[sink], loss_hook=loss_hook).run()
    return Run(result, events)


def read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_output_folder(out: Path) -> int:
    """Every checkpoint complete, loadable and finite; every state folder loadable. Returns files checked."""
    import torch
    from safetensors import safe_open

    from engine.state import load_state

    checked = 0
    for path in sorted(out.glob("*.safetensors")):
        assert path.stat().st_size > 0, path
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            assert keys, path
            for key in keys:
                assert bool(torch.isfinite(f.get_tensor(key)).all()), f"{path}: {key} not finite"
        checked += 1
    for folder in sorted(p for p in out.glob("*-state") if p.is_dir()):
        state = load_state(folder)
        assert all(bool(torch.isfinite(t).all()) for t in state.lora_tensors.values()), folder
        checked += 1
    return checked


def lrs_of(run: Run) -> dict[int, dict[str, float]]:
    return {e.step: e.lrs for e in run.steps}


# --------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory) -> Run:
    run = train(make_config(assets, tmp_path_factory.mktemp("straight") / "out"))
    assert run.result.status == "completed", run.result.error
    assert [e.step for e in run.steps] == list(range(1, N_STEPS + 1))
    return run


@pytest.fixture(scope="module")
def aborted(assets, tmp_path_factory) -> Run:
    run = train(make_config(assets, tmp_path_factory.mktemp("aborted") / "out"), abort_at=ABORT_AT)
    assert run.result.status == "aborted", run.result.error
    return run


# --------------------------------------------------------------------------- exact resume
def test_abort_then_resume_equals_the_straight_run(assets, straight, aborted):
    out = Path(aborted.result.final_path).parent
    # The abort saved a checkpoint and a state at the step it stopped on.
    (abort_ckpt,) = [e for e in aborted.of(CheckpointSaved) if e.kind == "abort"]
    assert abort_ckpt.step == ABORT_AT and Path(abort_ckpt.path).name == f"spyke_demo-step{ABORT_AT:08d}.safetensors"
    state_dir = out / f"spyke_demo-step{ABORT_AT:08d}-state"
    assert abort_ckpt.state_dir == str(state_dir) and state_dir.is_dir()
    assert aborted.finished.resume_hint and str(state_dir) in aborted.finished.resume_hint

    resumed = train(make_config(assets, out, resume=str(state_dir)))
    assert resumed.result.status == "completed", resumed.result.error
    (started,) = resumed.of(RunStarted)
    assert started.start_step == ABORT_AT

    # Step numbering, epochs, LR schedule and losses continue exactly where they stopped.
    ref = {e.step: e for e in straight.steps}
    got = [e.step for e in aborted.steps] + [e.step for e in resumed.steps]
    assert got == list(range(1, N_STEPS + 1))
    for e in aborted.steps + resumed.steps:
        assert e.loss == ref[e.step].loss, f"step {e.step}: {e.loss!r} != {ref[e.step].loss!r}"
        assert e.lrs == ref[e.step].lrs, f"step {e.step}"
        assert e.epoch == ref[e.step].epoch, f"step {e.step}"
    assert {e.epoch for e in resumed.steps} == {1, 2}  # the resumed part crosses into epoch 2

    # The same checkpoint names as the straight run (plus the abort one), the final tensors equal.
    straight_out = Path(straight.result.final_path).parent
    names = {p.name for p in straight_out.glob("*.safetensors")}
    assert names == {"spyke_demo-step00000002.safetensors", "spyke_demo-step00000004.safetensors",
                     "spyke_demo-step00000006.safetensors", "spyke_demo.safetensors"}
    assert {p.name for p in out.glob("*.safetensors")} == names | {abort_ckpt.path.rsplit("/", 1)[-1]}
    diff = max_abs_diff(read_tensors(straight.result.final_path), read_tensors(resumed.result.final_path))
    print(f"resume (abort at {ABORT_AT}) final LoRA max |diff| = {diff:.3g}")
    assert diff <= 1e-6
    for step in (4, 6):
        name = f"spyke_demo-step{step:08d}.safetensors"
        assert max_abs_diff(read_tensors(straight_out / name), read_tensors(out / name)) <= 1e-6
    # Every save was read back and checked.
    assert all(e.verified for e in straight.of(CheckpointSaved) + aborted.of(CheckpointSaved)
               + resumed.of(CheckpointSaved))
    assert check_output_folder(out) >= 6


def test_abort_always_leaves_a_state_even_without_save_state(assets, tmp_path):
    """Without --save_state the step-2 checkpoint has no state; an abort at step 2 must still write one.
    Resuming from it and aborting before the first step keeps that state as it was."""
    out = tmp_path / "out"
    run = train(make_config(assets, out, save_state=False), abort_at=2)
    state = out / "spyke_demo-step00000002-state"
    assert run.result.status == "aborted" and state.is_dir()
    assert run.finished.resume_hint and str(state) in run.finished.resume_hint
    assert not (out / "spyke_demo-step00000001-state").exists()
    inode = state.stat().st_ino

    from engine.trainer import Trainer

    control = TrainingControl()
    control.abort(save=True)  # before the first step of the resumed run
    result = Trainer(make_config(assets, out, save_state=False, resume="latest"), control=control).run()
    assert result.status == "aborted" and result.global_step == 2
    assert state.stat().st_ino == inode  # not rewritten (a kill mid-rewrite could have lost it)
    check_output_folder(out)


def test_cleanup_puts_back_a_state_moved_aside_by_a_killed_rewrite(tmp_path):
    import torch

    from engine.state import Progress, cleanup_temp_dirs, load_state, save_state

    dest = tmp_path / "run-step00000002-state"
    save_state(dest, lora_tensors={"a": torch.ones(2)}, optimizer_state={}, scheduler_state={}, rng_state={},
               progress=Progress(2, 0, 2, 0, "r", {}))
    aside = tmp_path / f".{dest.name}.tmp-old-abc123"  # killed between the two renames of a rewrite
    dest.rename(aside)
    partial = tmp_path / f".{dest.name}.tmp-999-def456"
    partial.mkdir()
    (partial / "lora.safetensors").write_bytes(b"12")
    removed = cleanup_temp_dirs(tmp_path)
    assert removed == [partial] and not partial.exists() and not aside.exists()
    assert load_state(dest).progress.global_step == 2


def test_resume_latest_with_cached_latents_and_accumulation(assets, tmp_path):
    """--resume latest, with cache_latents and gradient_accumulation_steps=2 (2 steps per epoch)."""
    opts = dict(cache_latents=True, gradient_accumulation_steps=2, max_train_steps=4, save_every_n_steps=1)
    ref = train(make_config(assets, tmp_path / "ref", **opts))
    assert ref.result.status == "completed", ref.result.error
    assert [(e.step, e.epoch) for e in ref.steps] == [(1, 1), (2, 1), (3, 2), (4, 2)]

    out = tmp_path / "run"
    first = train(make_config(assets, out, **opts), abort_at=2)  # stops exactly at the epoch boundary
    assert first.result.status == "aborted"
    resumed = train(make_config(assets, out, resume="latest", **opts))
    assert resumed.result.status == "completed", resumed.result.error
    assert [(e.step, e.epoch) for e in resumed.steps] == [(3, 2), (4, 2)]
    by_step = {e.step: e for e in ref.steps}
    for e in first.steps + resumed.steps:
        assert (e.loss, e.lrs) == (by_step[e.step].loss, by_step[e.step].lrs), f"step {e.step}"
    diff = max_abs_diff(read_tensors(ref.result.final_path), read_tensors(resumed.result.final_path))
    print(f"resume latest (cache_latents, accumulation 2) final LoRA max |diff| = {diff:.3g}")
    assert diff <= 1e-6


def test_resume_with_changed_settings_is_one_clear_error_unless_forced(assets, aborted, tmp_path):
    import shutil

    src = Path(aborted.result.final_path).parent / f"spyke_demo-step{ABORT_AT:08d}-state"
    out = tmp_path / "out"
    state_dir = out / src.name
    shutil.copytree(src, state_dir)
    changed = make_config(assets, out, resume=str(state_dir), network_dim=4)
    run = train(changed)
    assert run.result.status == "failed"
    message = run.result.error
    assert "\n" not in message and "network_dim" in message and "--resume_force" in message
    assert "8" in message and "4" in message  # saved and new values
    assert isinstance(ConfigError(message), ConfigError)
    # Not only the long-known settings: a loss or resize choice made later is guarded as well.
    other = train(make_config(assets, out, resume=str(state_dir), loss_type="huber", resize_interpolation="bicubic"))
    assert other.result.status == "failed"
    assert "loss_type: saved 'l2', now 'huber'" in other.result.error and "resize_interpolation" in other.result.error

    # A setting that does not change the run (how often to save) is not a mismatch; --resume_force
    # continues despite a changed one, and says so.
    forced = train(make_config(assets, out, resume=str(state_dir), max_train_steps=ABORT_AT + 1,
                               save_every_n_steps=None, resume_force=True))
    assert forced.result.status == "completed", forced.result.error
    assert [e.step for e in forced.steps] == [ABORT_AT + 1]
    assert any(e.level == "warning" and "max_train_steps" in e.message for e in forced.of(LogMessage))

    missing = train(make_config(assets, tmp_path / "empty", resume="latest"))
    assert missing.result.status == "failed" and "--resume latest" in missing.result.error


def test_damaged_state_is_a_clear_error(assets, aborted, tmp_path):
    import shutil

    src = Path(aborted.result.final_path).parent / f"spyke_demo-step{ABORT_AT:08d}-state"
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    (bad / "lora.safetensors").write_bytes((bad / "lora.safetensors").read_bytes()[:100])
    run = train(make_config(assets, tmp_path, resume=str(bad)))
    assert run.result.status == "failed"
    assert "damaged" in run.result.error and "\n" not in run.result.error


# --------------------------------------------------------------------------- what a resume may replace
def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``out`` (run folders included): its bytes and mtime."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def copy_run(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="module")
def other_run(assets, tmp_path_factory) -> Path:
    """A finished 2-step run of the same name that has nothing to do with ``aborted``."""
    out = tmp_path_factory.mktemp("other") / "out"
    run = train(make_config(assets, out, max_train_steps=2, save_every_n_steps=None, save_state=False, seed=7))
    assert run.result.status == "completed", run.result.error
    return out


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory) -> Run:
    """A finished 4-step run with a step-3 checkpoint: its final (step 4) exists under no step name."""
    run = train(make_config(assets, tmp_path_factory.mktemp("finished") / "out", max_train_steps=4,
                            save_every_n_steps=3))
    assert run.result.status == "completed", run.result.error
    return run


def foreign_state(out: Path, src: Path, name: str) -> None:
    import json

    dest = copy_run(src, out / name)
    progress = json.loads((dest / "progress.json").read_text())
    (dest / "progress.json").write_text(json.dumps({**progress, "run_id": "someone-elses-run"}))


@pytest.mark.parametrize("foreign", ["another_runs_final", "unreadable_final", "another_runs_state"])
def test_resume_into_folder_with_another_runs_file_is_refused(assets, aborted, other_run, tmp_path, foreign):
    state = Path(aborted.result.final_path).parent / f"spyke_demo-step{ABORT_AT:08d}-state"
    out = tmp_path / "out"
    clash = "spyke_demo.safetensors"
    if foreign == "another_runs_final":
        copy_run(other_run, out)
    elif foreign == "unreadable_final":
        out.mkdir()
        (out / clash).write_bytes(b"not a LoRA")
    else:
        clash = "spyke_demo-step00000004-state"
        out.mkdir()
        foreign_state(out, state, clash)
    before = snapshot(out)
    run = train(make_config(assets, out, resume=str(state)))
    assert run.result.status == "failed"
    assert run.result.error == (
        f"--output_dir={out} already holds {clash}, which is not from the run being resumed "
        f"({aborted.of(RunStarted)[0].run_id}); use another --output_name or --output_dir, or --overwrite to "
        "replace it")
    assert snapshot(out) == before  # nothing written, not even a run folder


def test_fresh_run_refuses_an_existing_state_folder_of_its_names(assets, aborted, tmp_path):
    state = Path(aborted.result.final_path).parent / f"spyke_demo-step{ABORT_AT:08d}-state"
    out = tmp_path / "out"
    out.mkdir()
    foreign_state(out, state, "spyke_demo-step00000002-state")
    before = snapshot(out)
    run = train(make_config(assets, out))
    assert run.result.error == (
        f"--output_dir={out} already holds spyke_demo-step00000002-state from an earlier run; use another "
        "--output_name or --output_dir, --resume latest to continue it, or --overwrite to replace it")
    assert snapshot(out) == before


def test_resume_never_saves_over_another_runs_file_at_its_start_step(assets, aborted, tmp_path):
    """An abort right after resuming saves at the state's own step, a name the plan does not list."""
    from engine.trainer import Trainer

    state = Path(aborted.result.final_path).parent / f"spyke_demo-step{ABORT_AT:08d}-state"
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / f"spyke_demo-step{ABORT_AT:08d}.safetensors"
    theirs.write_bytes(b"someone else's file")
    control = TrainingControl()
    control.abort(save=True)
    result = Trainer(make_config(assets, out, resume=str(state)), control=control).run()
    assert result.status == "failed"
    assert result.error.startswith(f"not saving {theirs}: it is not from this run (")
    assert "--overwrite" in result.error and "\n" not in result.error
    assert theirs.read_bytes() == b"someone else's file"


def test_extending_a_finished_run_keeps_its_earlier_final_under_its_step_name(assets, finished, tmp_path):
    out = copy_run(Path(finished.result.final_path).parent, tmp_path / "out")
    old_final = (out / "spyke_demo.safetensors").read_bytes()
    old_state = snapshot(out / "spyke_demo-state")
    run = train(make_config(assets, out, resume="latest", max_train_steps=6, save_every_n_steps=3,
                            resume_force=True))
    assert run.result.status == "completed", run.result.error
    assert [e.step for e in run.steps] == [5, 6]
    assert (out / "spyke_demo-step00000004.safetensors").read_bytes() == old_final
    assert snapshot(out / "spyke_demo-step00000004-state") == old_state
    assert (out / "spyke_demo-step00000006.safetensors").is_file() and (out / "spyke_demo-state").is_dir()
    assert any(e.level == "warning" and e.message == (
        "this resume writes a new final: kept the earlier final spyke_demo.safetensors (step 4) as "
        "spyke_demo-step00000004.safetensors and its state as spyke_demo-step00000004-state")
        for e in run.of(LogMessage))
    from engine.checkpoint import read_lora_metadata

    assert read_lora_metadata(out / "spyke_demo.safetensors")["ss_steps"] == "6"
    check_output_folder(out)


def test_extending_a_finished_run_whose_last_step_file_holds_the_same_weights(assets, straight, tmp_path):
    out = copy_run(Path(straight.result.final_path).parent, tmp_path / "out")
    old_final = read_tensors(out / "spyke_demo.safetensors")
    step_file = out / "spyke_demo-step00000006.safetensors"
    kept = step_file.read_bytes()
    run = train(make_config(assets, out, resume="latest", max_train_steps=N_STEPS + 2, resume_force=True))
    assert run.result.status == "completed", run.result.error
    assert step_file.read_bytes() == kept and max_abs_diff(read_tensors(step_file), old_final) == 0
    assert any(e.message == "this resume writes a new final: the earlier final spyke_demo.safetensors (step 6) "
               "has the same weights as spyke_demo-step00000006.safetensors, which stays" for e in run.of(LogMessage))


def test_extending_a_finished_run_refuses_when_its_step_name_is_taken(assets, finished, tmp_path):
    import shlex
    import subprocess

    out = copy_run(Path(finished.result.final_path).parent, tmp_path / "out")
    (out / "spyke_demo-step00000004.safetensors").write_bytes(b"a file the user put here")
    before = snapshot(out)
    extend = make_config(assets, out, resume="latest", max_train_steps=6, save_every_n_steps=3, resume_force=True)
    run = train(extend)
    assert run.result.status == "failed" and snapshot(out) == before
    keep = f"mv {out / 'spyke_demo.safetensors'} {out / 'kept-spyke_demo-step00000004.safetensors'}"
    assert run.result.error == (
        f"--output_dir={out} holds this run's final spyke_demo.safetensors (step 4) and "
        "spyke_demo-step00000004.safetensors is taken, so the new final would replace it; keep it first with: "
        f"{keep} — or add --overwrite to replace it")
    # The printed command keeps it; then the run continues.
    subprocess.run(shlex.split(keep), check=True)
    again = train(extend)
    assert again.result.status == "completed", again.result.error
    assert (out / "kept-spyke_demo-step00000004.safetensors").read_bytes() == before["spyke_demo.safetensors"][0]
    assert (out / "spyke_demo-step00000004.safetensors").read_bytes() == b"a file the user put here"


@pytest.mark.parametrize("resume", ["latest", f"spyke_demo-step{N_STEPS:08d}-state"])
def test_resuming_a_finished_run_changes_nothing(assets, straight, tmp_path, resume):
    import io

    from engine.headless import run_headless

    out = copy_run(Path(straight.result.final_path).parent, tmp_path / "out")
    before = snapshot(out)
    buf = io.StringIO()
    rc = run_headless(make_config(assets, out, resume=resume if resume == "latest" else str(out / resume)), out=buf)
    text = buf.getvalue()
    assert rc == 0, text
    assert (f"warning: this run already finished at step {N_STEPS}: {out / 'spyke_demo.safetensors'}; nothing "
            "changed (to train further, raise --max_train_steps and add --resume_force)") in text
    assert f"finished: completed at step {N_STEPS} -> {out / 'spyke_demo.safetensors'}" in text
    assert "Traceback" not in text and "\nstep " not in text
    assert snapshot(out) == before

# --------------------------------------------------------------------------- NaN guard
def nan_at(*steps: int):
    def hook(step, loss):
        return loss * float("nan") if step in steps else loss

    return hook


def test_nan_stop_names_step_and_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "out"
    run = train(make_config(assets, out), loss_hook=nan_at(3))
    assert run.result.status == "failed"
    fin = run.finished
    assert fin.status == "failed" and fin.step == 2
    last_good = out / "spyke_demo-step00000002.safetensors"
    assert "step 3" in fin.error and str(last_good) in fin.error and "\n" not in fin.error
    assert fin.resume_hint and str(out / "spyke_demo-step00000002-state") in fin.resume_hint
    assert [e.step for e in run.steps] == [1, 2]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [last_good.name]  # nothing after the NaN
    assert not (out / "spyke_demo.safetensors").exists()
    check_output_folder(out)


def test_nan_skip_drops_the_update_and_stops_after_too_many(assets, tmp_path):
    from engine.train.nan_policy import NAN_SKIP_LIMIT

    total = 3 + NAN_SKIP_LIMIT + 1
    out = tmp_path / "out"
    bad = (2,) + tuple(range(4, 4 + NAN_SKIP_LIMIT))  # one lone NaN, then NAN_SKIP_LIMIT in a row
    seen: list[int] = []

    def hook(step, loss):
        seen.append(step)
        return loss * float("nan") if step in bad else loss

    run = train(make_config(assets, out, nan_policy="skip", max_train_steps=total, save_every_n_steps=1),
                loss_hook=hook)
    steps = {e.step: e for e in run.steps}
    assert steps[2].skipped and math.isnan(steps[2].loss)
    assert not steps[3].skipped and math.isfinite(steps[3].loss)  # training went on after the lone NaN
    assert [s for s, e in steps.items() if e.skipped] == [2] + list(range(4, 3 + NAN_SKIP_LIMIT))
    assert run.result.status == "failed"
    assert f"{NAN_SKIP_LIMIT} skipped steps in a row" in run.result.error
    assert f"step {3 + NAN_SKIP_LIMIT}" in run.result.error
    assert max(seen) == 3 + NAN_SKIP_LIMIT  # stopped there, not at the end
    # A skipped step leaves the weights alone: the step-2 checkpoint equals the step-1 one.
    w1 = read_tensors(out / "spyke_demo-step00000001.safetensors")
    w2 = read_tensors(out / "spyke_demo-step00000002.safetensors")
    assert max_abs_diff(w1, w2) == 0.0
    assert not (out / "spyke_demo.safetensors").exists()
    check_output_folder(out)


def test_nan_rollback_restores_last_state_with_half_the_learning_rate(assets, straight, tmp_path):
    """The NaN at step 3 comes from the input (the same weights and noise give NaN again), so a
    rollback has to continue with other noise to get past it, at half the learning rate."""
    poisoned: list[float] = []

    def hook(step, loss):
        value = float(loss.detach())
        if step == 3 and (not poisoned or value in poisoned):
            poisoned.append(value)
            return loss * float("nan")
        return loss

    out = tmp_path / "out"
    run = train(make_config(assets, out, nan_policy="rollback"), loss_hook=hook)
    assert run.result.status == "completed", run.result.error
    assert len(poisoned) == 1
    assert [e.step for e in run.steps] == list(range(1, N_STEPS + 1))
    assert any("rolled back to step 2" in e.message for e in run.of(LogMessage))
    ref = lrs_of(straight)
    got = lrs_of(run)
    for step in (1, 2):
        assert got[step] == ref[step]
        assert run.steps[step - 1].loss == straight.steps[step - 1].loss
    for step in range(3, N_STEPS + 1):
        for group, lr in ref[step].items():
            assert got[step][group] == pytest.approx(lr * 0.5, rel=1e-9), (step, group)
    assert len(run.result.losses) == N_STEPS and all(math.isfinite(x) for x in run.result.losses)
    assert check_output_folder(out) >= 4


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_absurd_learning_rate_never_writes_a_non_finite_file(assets, tmp_path, policy):
    out = tmp_path / "out"
    run = train(make_config(assets, out, unet_lr=1e6, text_encoder_lr=1e6, learning_rate=1e6, max_train_steps=5,
                            save_every_n_steps=1, nan_policy=policy))
    # It diverges (stop: the run fails at the NaN; skip: NaN steps are dropped), and nothing
    # non-finite is ever on disk.
    if policy == "stop":
        assert run.result.status == "failed" and "non-finite" in run.result.error and "\n" not in run.result.error
    else:
        assert any(e.skipped for e in run.steps)
    assert check_output_folder(out) >= 2


def test_state_writer_refuses_non_finite_weights(tmp_path):
    import torch

    from engine.errors import CheckpointError
    from engine.state import Progress, save_state

    dest = tmp_path / "run-step00000001-state"
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        save_state(dest, lora_tensors={"a": torch.tensor([1.0, float("inf")])}, optimizer_state={},
                   scheduler_state={}, rng_state={}, progress=Progress(1, 0, 1, 0, "r", {}))
    assert not dest.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- write faults
class _FaultyFile:
    """Writes half the bytes, then fails like a full disk / a revoked permission."""

    def __init__(self, fh, err: int) -> None:
        self.fh, self.err = fh, err

    def write(self, data) -> int:
        self.fh.write(bytes(data[: len(data) // 2]))
        self.fh.flush()
        raise OSError(self.err, os.strerror(self.err))

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()
        return False


def _break_checkpoint_writes(monkeypatch, err: int, after: int) -> None:
    """The checkpoint writer's ``after``+1-th file and later ones fail with ``err``."""
    import engine.io.atomic as ckpt

    calls = [0]
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        calls[0] += 1
        fh = real_fdopen(fd, *args, **kwargs)
        return _FaultyFile(fh, err) if calls[0] > after else fh

    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    proxy.fdopen = fdopen
    monkeypatch.setattr(ckpt, "os", proxy)


def _bytes_at_step(path, step: int):
    """A loss hook that keeps ``path``'s bytes as they are when ``step`` starts, and where they go."""
    before: dict[str, bytes] = {}

    def hook(at, loss):
        if at == step and not before:
            before["bytes"] = path.read_bytes()
        return loss
    return hook, before


def test_disk_full_during_a_save_keeps_earlier_files_and_leaves_a_resumable_state(assets, straight, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "out"
    first = out / "spyke_demo-step00000002.safetensors"
    hook, before = _bytes_at_step(first, 3)

    _break_checkpoint_writes(monkeypatch, errno.ENOSPC, after=1)
    run = train(make_config(assets, out), loss_hook=hook)
    fin = run.finished
    assert fin.status == "failed" and fin.step == 4
    assert "No space left on device" in fin.error and "spyke_demo-step00000004.safetensors" in fin.error
    assert "\n" not in fin.error
    assert any(e.level == "error" and e.message == fin.error for e in run.of(LogMessage))
    assert first.read_bytes() == before["bytes"]  # the earlier checkpoint is untouched
    assert not (out / "spyke_demo-step00000004.safetensors").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the half-written temp file is gone
    # The weights at step 4 were still saved as a state (the state writer still worked).
    state4 = out / "spyke_demo-step00000004-state"
    assert state4.is_dir() and fin.resume_hint and str(state4) in fin.resume_hint
    check_output_folder(out)

    # That state resumes to the same result as the uninterrupted run.
    monkeypatch.undo()
    resumed = train(make_config(assets, out, resume=str(state4)))
    assert resumed.result.status == "completed", resumed.result.error
    assert [e.loss for e in resumed.steps] == [e.loss for e in straight.steps[4:]]
    assert max_abs_diff(read_tensors(straight.result.final_path), read_tensors(resumed.result.final_path)) <= 1e-6


def test_permission_lost_during_a_save_is_one_clear_line(assets, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "out"
    _break_checkpoint_writes(monkeypatch, errno.EACCES, after=1)
    real_save_file = safetensors.torch.save_file
    state_calls = [0]

    def save_file(*args, **kwargs):  # the state writer loses the permission at the same time
        state_calls[0] += 1
        if state_calls[0] > 1:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    first = out / "spyke_demo-step00000002.safetensors"
    hook, before = _bytes_at_step(first, 3)

    run = train(make_config(assets, out), loss_hook=hook)
    fin = run.finished
    assert fin.status == "failed" and "Permission denied" in fin.error and "\n" not in fin.error
    assert "permissions" in fin.error  # says what to do
    assert first.read_bytes() == before["bytes"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    # No new state could be written: the hint points at the last good one.
    assert fin.resume_hint and str(out / "spyke_demo-step00000002-state") in fin.resume_hint
    assert not (out / "spyke_demo-step00000004-state").exists()
    check_output_folder(out)


# --------------------------------------------------------------------------- subprocesses
# A "zygote" process imports torch/diffusers/transformers once (about 5 s) and forks one
# child per training run; each child is a real headless run (engine.headless.run_headless,
# as `spyke-cockpit train --headless` calls it, signal handlers included) that the test can
# SIGKILL or SIGINT. The zygote runs no tensor op before forking, so each child starts its
# own thread pools. The real CLI is run once, for the printed resume command.
ZYGOTE = r"""
import json, os, select, signal, sys, traceback
from pathlib import Path
import torch, diffusers, transformers, accelerate, peft, safetensors.torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
import engine.trainer, engine.models, engine.lora, engine.dataset, engine.state, engine.checkpoint
from engine.config_io import build_config
from engine.headless import run_headless
children = {}

def reap():  # each child's exit code goes to <log>.rc once it is gone
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        Path(children.pop(pid) + ".rc").write_text(str(os.waitstatus_to_exitcode(status)))

print("ready", flush=True)
while True:
    ready = select.select([sys.stdin], [], [], 0.002)[0]
    reap()
    if not ready:
        continue
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        rc = 3
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            rc = run_headless(build_config(Path(req["toml"]), req["overrides"]).validate(), out=sys.stdout)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(rc)
    children[pid] = req["log"]
    print(pid, flush=True)
"""


def exit_code(log: Path, timeout: float = 120) -> int:
    rc = Path(f"{log}.rc")
    wait_for(rc.exists, timeout, f"the exit code of {log.name}", poll=0.01)
    return int(rc.read_text())


class Zygote:
    def __init__(self) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout.readline().strip() == "ready"
        self.children: list[int] = []

    def spawn(self, toml: Path, log: Path, **overrides) -> int:
        import json

        self.proc.stdin.write(json.dumps({"toml": str(toml), "log": str(log), "overrides": overrides}) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        self.children.append(pid)
        return pid

    def close(self) -> None:
        import signal

        for pid in self.children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill9(pid: int) -> None:
    import signal
    import time

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid):  # the zygote reaps its children, so the pid vanishes once the child is dead
        assert time.monotonic() < deadline, f"pid {pid} did not die"
        time.sleep(0.002)


def wait_for(predicate, timeout: float, what: str, pid: int | None = None, poll: float = 0.002):
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if pid is not None and not alive(pid):
            return None
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def text_of(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def temp_entries(out: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(out) if ".tmp-" in e.name}
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def write_toml(config, path: Path) -> Path:
    from engine.config_io import to_toml

    path.write_text(to_toml(config))
    return path


def events_of(out: Path) -> list:
    from engine.run.journal import parse_line

    events = []
    for log in sorted(out.glob(".spyke/*/events.jsonl")):
        events += [e for e in map(parse_line, log.read_text().splitlines()) if e is not None]
    return events


def test_sigkill_then_resume_latest_equals_the_straight_run(assets, straight, zygote, tmp_path):
    from engine.state import find_latest_state

    out = tmp_path / "out"
    toml = write_toml(make_config(assets, out, save_every_n_steps=1), tmp_path / "run.toml")
    pid = zygote.spawn(toml, tmp_path / "child.log")
    wait_for(lambda: (out / "spyke_demo-step00000003-state").is_dir(), 120, "the step-3 state", pid)
    kill9(pid)
    latest = find_latest_state(out, "spyke_demo")
    killed_at = int(latest.name.split("-step")[1][:8])
    assert killed_at >= 3 and not (out / "spyke_demo.safetensors").exists()
    check_output_folder(out)

    resumed = train(make_config(assets, out, save_every_n_steps=1, resume="latest"))
    assert resumed.result.status == "completed", resumed.result.error
    ref = {e.step: e.loss for e in straight.steps}
    killed_losses = {e.step: e.loss for e in events_of(out) if isinstance(e, StepCompleted) and e.step <= killed_at}
    assert killed_losses == {s: ref[s] for s in range(1, killed_at + 1)}
    assert {e.step: e.loss for e in resumed.steps} == {s: ref[s] for s in range(killed_at + 1, N_STEPS + 1)}
    diff = max_abs_diff(read_tensors(straight.result.final_path), read_tensors(resumed.result.final_path))
    print(f"resume after SIGKILL at step {killed_at}: final LoRA max |diff| = {diff:.3g}")
    assert diff <= 1e-6


KILLS = 10


def test_sigkill_at_random_moments_never_leaves_a_partial_file(assets, zygote, tmp_path):
    """Kill -9 a training that saves a checkpoint + state every step, 10 times: over half of the kills
    land while a temp file/folder of the save is open. After each, every file must be complete."""
    import random
    import time

    from engine.state import find_latest_state

    seed = random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    out = tmp_path / "out"
    toml = write_toml(make_config(assets, out, save_every_n_steps=1, max_train_steps=10_000), tmp_path / "run.toml")
    leftovers: set[str] = set()
    files_checked = mid_save = cleaned = 0
    for i in range(KILLS):
        last = i == KILLS - 1
        resume = find_latest_state(out, "spyke_demo") is not None and not last
        # the last run is a fresh one into the same folder (overwriting): it must clean up too
        overrides = {"resume": "latest"} if resume else {"overwrite": True}
        log = tmp_path / f"child{i}.log"
        pid = zygote.spawn(toml, log, **overrides)
        started = wait_for(lambda: "\nrun " in "\n" + text_of(log), 60, f"run {i} to start", pid)
        if started and leftovers:
            assert not leftovers & temp_entries(out), f"run {i} did not clean up {leftovers & temp_entries(out)}"
            cleaned += len(leftovers)
            leftovers = set()
        if i % 2 == 0 or last:  # during a save: the moment this child's temp file/folder appears
            mark = f".tmp-{pid}-"
            want = rng.choice([".safetensors", "-state"])
            hit = wait_for(lambda: [n for n in temp_entries(out) if mark in n and want in n], 60,
                           f"a save by run {i}", pid, poll=0.0005)
            mid_save += bool(hit)
        else:  # a random moment of training (after the first step)
            wait_for(lambda: "\nstep " in text_of(log), 60, f"run {i}'s first step", pid)
            time.sleep(rng.uniform(0.0, 0.8))
        assert alive(pid), f"run {i} ended by itself:\n{text_of(log)[-2000:]}"
        kill9(pid)
        files_checked += check_output_folder(out)
        leftovers |= temp_entries(out)
    print(f"kill seed {seed}: {KILLS} kills ({mid_save} mid-save), {files_checked} files checked, "
          f"{cleaned} leftover temps cleaned up by the next run")
    assert mid_save >= KILLS // 2 and cleaned > 0
    assert list(out.glob("*.safetensors")) and list(out.glob("*-state"))


# --------------------------------------------------------------------------- the headless CLI
def start_cli(args: list[str], log: Path):
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "spyke-cockpit"
    fh = open(log, "w")
    return subprocess.Popen([str(exe), *args], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)


def test_sigint_saves_at_the_current_step_and_the_printed_resume_finishes(assets, straight, zygote, tmp_path):
    """SIGINT to a headless run (a zygote child in run_headless) saves and exits 0; the resume line it
    prints, run as a real `spyke-cockpit` command, finishes the run exactly."""
    import re
    import shlex
    import signal

    out = tmp_path / "out"
    toml = write_toml(make_config(assets, out, save_every_n_steps=None), tmp_path / "run.toml")
    log = tmp_path / "first.log"
    pid = zygote.spawn(toml, log)
    wait_for(lambda: "\nstep 2/" in text_of(log), 120, "step 2", pid)
    os.kill(pid, signal.SIGINT)
    assert exit_code(log) == 0, text_of(log)
    text = text_of(log)
    assert "stopping (SIGINT)" in text and "Traceback" not in text, text
    step = int(re.search(r"^finished: aborted at step (\d+)", text, re.M).group(1))
    assert 2 <= step < N_STEPS
    assert (out / f"spyke_demo-step{step:08d}.safetensors").is_file()
    state = out / f"spyke_demo-step{step:08d}-state"
    assert state.is_dir() and f"state {state}" in text
    hint = re.search(r"^to resume: (.*)$", text, re.M).group(1)
    run_config = out / ".spyke" / re.search(r"^run (\S+):", text, re.M).group(1) / "config.toml"
    assert shlex.split(hint) == ["spyke-cockpit", "train", "--headless", str(run_config), "--resume", str(state)]

    args = shlex.split(hint)[1:]                   # run exactly as printed
    log2 = tmp_path / "resume.log"
    proc = start_cli(args, log2)
    assert proc.wait(timeout=300) == 0, text_of(log2)
    text = text_of(log2)
    assert re.search(rf"^step {step + 1}/{N_STEPS} ", text, re.M) and f"finished: completed at step {N_STEPS}" in text
    diff = max_abs_diff(read_tensors(straight.result.final_path), read_tensors(out / "spyke_demo.safetensors"))
    print(f"resume after SIGINT at step {step} (CLI): final LoRA max |diff| = {diff:.3g}")
    assert diff <= 1e-6


def test_second_sigint_exits_at_once_without_partial_files(assets, zygote, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    toml = write_toml(make_config(assets, out, save_every_n_steps=None, max_train_steps=1000), tmp_path / "run.toml")
    log = tmp_path / "cli.log"
    pid = zygote.spawn(toml, log)
    wait_for(lambda: "\nstep 1/" in text_of(log), 120, "step 1", pid)
    os.kill(pid, signal.SIGINT)
    first = time.monotonic()
    wait_for(lambda: "stopping (SIGINT)" in text_of(log), 2, "the first SIGINT to be seen", pid)
    # Aim the second one at the abort's save (its temp file or folder), within the 3 s window.
    before = temp_entries(out)
    try:
        during_save = wait_for(lambda: temp_entries(out) - before, 2.5 - (time.monotonic() - first),
                               "the abort's save", pid, poll=0.0005)
    except AssertionError:
        during_save = None
    sent = time.monotonic()
    os.kill(pid, signal.SIGINT)
    assert exit_code(log, 10) == 130, text_of(log)
    assert time.monotonic() - sent < 2.0
    text = text_of(log)
    assert "interrupted again" in text and "finished:" not in text, text
    print(f"second SIGINT {'during the abort save' if during_save else 'before the abort save'}")
    check_output_folder(out)  # whatever was being written is a temp file, never a partial checkpoint


def test_output_folder_removed_mid_run_is_one_clear_line(assets, tmp_path):
    import shutil

    out = tmp_path / "out"

    def hook(step, loss):
        if step == 3 and out.exists():
            shutil.rmtree(out)
        return loss

    run = train(make_config(assets, out), loss_hook=hook)
    fin = run.finished
    assert fin.status == "failed" and fin.step == 4 and "\n" not in fin.error
    assert "No such file or directory" in fin.error and "spyke_demo-step00000004.safetensors" in fin.error
    # The state writer recreates the folder: the run is still resumable from step 4.
    assert fin.resume_hint and str(out / "spyke_demo-step00000004-state") in fin.resume_hint
    check_output_folder(out)


def test_sigterm_in_headless_mode_saves_and_exits_zero(assets, tmp_path):
    """run_headless in this process: a SIGTERM after step 2 stops the run with a checkpoint + state."""
    import io
    import signal

    from engine.headless import run_headless

    class Out(io.StringIO):
        def write(self, text):
            if text.startswith("step 2/"):
                os.kill(os.getpid(), signal.SIGTERM)
            return super().write(text)

    out = tmp_path / "out"
    buf = Out()
    before = signal.getsignal(signal.SIGTERM)
    rc = run_headless(make_config(assets, out, save_every_n_steps=None), out=buf)
    text = buf.getvalue()
    assert rc == 0, text
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    assert "stopping (SIGTERM)" in text and "finished: aborted at step" in text and "to resume:" in text
    step = int(text.split("finished: aborted at step ")[1].split()[0])
    assert (out / f"spyke_demo-step{step:08d}.safetensors").is_file()
    assert (out / f"spyke_demo-step{step:08d}-state").is_dir()


# One optimizer of each library and family; the AdamW case is the full test above.
RESUMED_OPTIMIZERS = {
    "AdamW8bit": {}, "Lion": {}, "SGDNesterov": {}, "Adafactor": {},
    "Prodigy": {"learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": 1.0},
    "DAdaptAdam": {"learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": 1.0},
    "AdamWScheduleFree": {"lr_scheduler": "constant"},
}


def check_resume_equals_straight(assets, out, **opts) -> None:
    """4 steps straight (a state at step 2), then again from the step-2 state: same losses, LRs and weights."""
    straight = train(make_config(assets, out, max_train_steps=4, **opts))
    assert straight.result.status == "completed", straight.result.error
    final = read_tensors(straight.result.final_path)
    step4 = read_tensors(out / "spyke_demo-step00000004.safetensors")
    resumed = train(make_config(assets, out, max_train_steps=4, resume=str(out / "spyke_demo-step00000002-state"),
                                **opts))
    assert resumed.result.status == "completed", resumed.result.error
    assert [e.step for e in resumed.steps] == [3, 4]
    ref = {e.step: e for e in straight.steps}
    for e in resumed.steps:
        assert (e.loss, e.lrs) == (ref[e.step].loss, ref[e.step].lrs), f"step {e.step}"
    assert max_abs_diff(final, read_tensors(resumed.result.final_path)) == 0.0
    assert max_abs_diff(step4, read_tensors(out / "spyke_demo-step00000004.safetensors")) == 0.0


@pytest.mark.parametrize("optimizer", list(RESUMED_OPTIMIZERS))
def test_resume_from_a_saved_state_equals_the_straight_run_for_each_optimizer(assets, tmp_path, optimizer):
    check_resume_equals_straight(assets, tmp_path / "out", optimizer_type=optimizer, **RESUMED_OPTIMIZERS[optimizer])


def test_resume_with_caption_dropout_shuffle_and_color_aug_equals_the_straight_run(assets, tmp_path):
    aug = dict(caption_dropout_rate=0.3, shuffle_caption=True, color_aug=True, flip_aug=True)
    straight_run = train(make_config(assets, tmp_path / "straight" / "out", **aug))
    assert straight_run.result.status == "completed", straight_run.result.error
    out = tmp_path / "aborted" / "out"
    first = train(make_config(assets, out, **aug), abort_at=ABORT_AT)
    assert first.result.status == "aborted", first.result.error
    state_dir = out / f"spyke_demo-step{ABORT_AT:08d}-state"
    resumed = train(make_config(assets, out, resume=str(state_dir), **aug))
    assert resumed.result.status == "completed", resumed.result.error
    ref = {e.step: e.loss for e in straight_run.steps}
    assert {e.step: e.loss for e in first.steps + resumed.steps} == ref
    assert max_abs_diff(read_tensors(Path(straight_run.result.final_path)),
                        read_tensors(Path(resumed.result.final_path))) == 0.0
