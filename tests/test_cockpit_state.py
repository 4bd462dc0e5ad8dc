"""The cockpit's reducer, without Textual: phases, ETA, EMA, checkpoints, bounded history."""

from __future__ import annotations

import math
import time

import pytest

from cockpit.state import (AbortRequested, CockpitState, LossHistory, PauseRequested, PlanPreviewed, SaveRequested,
                           SmoothingChanged, StartFailed, StartRequested, best_validation, status_word, elapsed,
                           eta_next_checkpoint, eta_seconds, format_duration,
                           memory_pressure, next_checkpoint, progress_text, reduce, reduce_all, smooth,
                           resume_command, steps_per_second)
from engine.events import (CheckpointSaved, LogMessage, MemorySample, PhaseChanged, RunFinished, RunStarted,
                           SamplesSaved, StepCompleted, ValidationLoss)

T0 = 1_000.0


def started(total=100, checkpoints=(25, 50, 100), t=T0):
    return RunStarted(run_id="r", output_dir="/out", output_name="x", total_steps=total, num_epochs=4,
                      batches_per_epoch=25, device="cpu", pid=1, config={}, checkpoint_steps=list(checkpoints), t=t)


def step(n, loss=1.0, t=None, epoch=1, skipped=False):
    return StepCompleted(step=n, epoch=epoch, loss=loss, lrs={"unet": 1e-4}, step_seconds=0.5,
                         skipped=skipped, t=T0 + 10 + n * 0.5 if t is None else t)


def test_run_lifecycle_phases_and_status():
    s = reduce(CockpitState(), StartRequested())
    assert s.status == "starting" and s.running
    s = reduce(s, started())
    assert s.status == "running" and s.total_steps == 100 and s.checkpoint_steps == (25, 50, 100)
    s = reduce(s, PhaseChanged(phase="caching", detail="latents", t=T0 + 1))
    assert (s.phase, s.phase_detail) == ("caching", "latents")
    s = reduce(s, PhaseChanged(phase="training", t=T0 + 2))
    s = reduce_all(s, [step(i) for i in range(1, 11)])
    assert s.step == 10 and progress_text(s) == "step 10/100"
    s = reduce(s, RunFinished(status="completed", step=100, final_path="/out/x.safetensors", t=T0 + 70))
    assert s.status == "completed" and not s.running and s.phase == "finished" and s.step == 100


def test_pause_is_visible_at_once_and_confirmed_by_the_engine():
    s = reduce_all(CockpitState(), [started(), PhaseChanged(phase="training"), step(1)])
    s = reduce(s, PauseRequested(True))
    assert s.pause_requested and not s.paused          # shown at once, engine not there yet
    s = reduce(s, PhaseChanged(phase="paused"))
    assert s.paused and s.pause_requested
    s = reduce(s, PauseRequested(False))
    assert s.paused and not s.pause_requested          # resuming…
    s = reduce(s, PhaseChanged(phase="training"))
    assert not s.paused and not s.pause_requested


def test_engine_initiated_pause_sets_the_request_too():
    s = reduce_all(CockpitState(), [started(), PhaseChanged(phase="paused")])
    assert s.paused and s.pause_requested


def test_rate_eta_and_next_checkpoint():
    s = reduce_all(CockpitState(), [started(total=100), PhaseChanged(phase="training")])
    s = reduce_all(s, [step(i, t=T0 + 10 + i * 0.5) for i in range(1, 21)])   # 2 it/s
    assert steps_per_second(s) == pytest.approx(2.0)
    assert eta_seconds(s) == pytest.approx(80 / 2.0)
    assert next_checkpoint(s) == 25
    assert eta_next_checkpoint(s) == pytest.approx(5 / 2.0)
    assert elapsed(s, T0 + 30) == pytest.approx(30)
    s = reduce_all(s, [step(i, t=T0 + 10 + i * 0.5) for i in range(21, 60)])
    assert next_checkpoint(s) == 100
    s = reduce(s, RunFinished(status="completed", step=100, t=T0 + 100))
    assert elapsed(s, T0 + 5000) == pytest.approx(100)    # frozen once finished


def test_a_pause_is_taken_out_of_it_per_second_elapsed_and_eta():
    s = reduce_all(CockpitState(), [started(total=100, t=T0), PhaseChanged(phase="training", t=T0)])
    s = reduce_all(s, [step(i, t=T0 + i) for i in range(1, 5)])           # 1 it/s
    eta_before = eta_seconds(s)
    s = reduce(s, PauseRequested(True))
    s = reduce_all(s, [step(5, t=T0 + 5), PhaseChanged(phase="paused", t=T0 + 5)])
    assert steps_per_second(s) == pytest.approx(1.0)                      # stopped, not reset
    assert elapsed(s, T0 + 300) == pytest.approx(5) == elapsed(s, T0 + 5)  # the clock stopped at the pause
    s = reduce_all(s, [PauseRequested(False), PhaseChanged(phase="training", t=T0 + 500)])
    assert elapsed(s, T0 + 502) == pytest.approx(7)
    s = reduce_all(s, [step(6, t=T0 + 501), step(7, t=T0 + 502)])
    assert steps_per_second(s) == pytest.approx(1.0)                      # the 495 s pause does not count
    assert eta_seconds(s) == pytest.approx(eta_before - 3)                 # no jump after resuming
    s = reduce(s, RunFinished(status="completed", step=7, t=T0 + 510))
    assert elapsed(s, T0 + 9000) == pytest.approx(15)


def test_pausing_until_the_engine_confirms_then_paused_and_resuming_likewise():
    s = reduce_all(CockpitState(), [started(), PhaseChanged(phase="training"), step(1)])
    before = s
    s = reduce(s, PauseRequested(True))
    assert status_word(s)[0] == "PAUSING…" and s.pending == "pause" and not s.paused
    assert before.pending == "" and status_word(before)[0] == "TRAINING"   # the state given is unchanged
    s = reduce(s, step(2))                                                # the step in flight lands
    assert status_word(s)[0] == "PAUSING…" and s.step == 2
    s = reduce(s, PhaseChanged(phase="paused"))
    assert status_word(s)[0] == "PAUSED" and s.pending == ""
    s = reduce(s, PauseRequested(False))
    assert status_word(s)[0] == "RESUMING…" and s.paused
    s = reduce(s, PhaseChanged(phase="training"))
    assert status_word(s)[0] == "TRAINING" and not s.paused and s.pending == ""


def test_a_resume_before_the_engine_paused_waits_for_nothing():
    s = reduce_all(CockpitState(), [started(), PhaseChanged(phase="training"), PauseRequested(True),
                                    PauseRequested(False)])
    assert s.pending == "" and status_word(s)[0] == "TRAINING"


def test_a_save_inside_a_pause_keeps_it_paused_and_its_clock_stopped():
    s = reduce_all(CockpitState(), [started(t=T0), PhaseChanged(phase="training", t=T0), step(1, t=T0 + 1),
                                    step(2, t=T0 + 2), PhaseChanged(phase="paused", t=T0 + 2)])
    s = reduce_all(s, [PhaseChanged(phase="saving", t=T0 + 50), PhaseChanged(phase="paused", t=T0 + 60)])
    assert s.pause_requested and s.paused and elapsed(s, T0 + 100) == pytest.approx(2)
    assert steps_per_second(s) == pytest.approx(1.0)


def test_aborting_until_the_run_finishes_even_through_a_resume():
    s = reduce_all(CockpitState(), [started(), PhaseChanged(phase="paused"), AbortRequested(save=True)])
    assert status_word(s)[0] == "ABORTING…" and "saving a checkpoint" in status_word(s)[1]
    s = reduce(s, PhaseChanged(phase="training"))          # the engine leaves its pause to stop
    assert status_word(s)[0] == "ABORTING…"
    s = reduce_all(s, [PhaseChanged(phase="finished", detail="aborted"), RunFinished(status="aborted", step=3)])
    assert status_word(s)[0] == "ABORTED" and s.pending == ""


def test_the_planned_total_shows_before_start_and_a_run_replaces_it():
    s = reduce(CockpitState(), PlanPreviewed(128, 2))
    assert progress_text(s) == "step 0/128" and s.num_epochs == 2
    s = reduce_all(s, [StartRequested(), started(total=100)])
    assert progress_text(s) == "step 0/100"
    assert reduce(s, PlanPreviewed(5)).total_steps == 100                # a live run's total is the engine's


def test_a_new_start_keeps_the_ended_run_on_screen_and_a_failed_start_restores_it():
    s = reduce_all(CockpitState(), [started(), step(1, loss=0.5), step(2, loss=0.4),
                                    CheckpointSaved(path="/out/x.safetensors", step=2, epoch=1, bytes=1, kind="final",
                                                    state_dir="/out/x-state"),
                                    RunFinished(status="completed", step=2)])
    assert s.last_state_dir == "/out/x-state"
    s = reduce(s, StartRequested())
    assert s.running and len(s.history) == 2 and len(s.checkpoints) == 1
    s = reduce(s, StartFailed("--output_dir=/out already holds x.safetensors"))
    assert s.status == "completed" and not s.running and len(s.history) == 2 and len(s.checkpoints) == 1
    assert s.log[-1].message.startswith("--output_dir=/out already holds")
    s = reduce_all(s, [StartRequested(), started()])
    assert len(s.history) == 0 and s.checkpoints == ()                    # the new run has begun


def test_an_error_the_engine_logged_is_not_logged_again_by_the_finish():
    s = reduce_all(CockpitState(), [started(), LogMessage(level="error", message="disk full"),
                                    RunFinished(status="failed", step=1, error="disk full")])
    assert [line.message for line in s.log].count("disk full") == 1


def test_ema_is_debiased_and_adjustable():
    s = reduce_all(CockpitState(), [started(), PhaseChanged(phase="training")])
    s = reduce(s, step(1, loss=2.0))
    assert s.loss_ema == pytest.approx(2.0)               # debiased: first value is the value
    s = reduce(s, step(2, loss=0.0))
    expected = (0.9 * 0.1 * 2.0 + 0.1 * 0.0) / (0.9 * 0.1 + 0.1)
    assert s.loss_ema == pytest.approx(expected)
    s = reduce(s, SmoothingChanged(0.0))
    assert s.smoothing == 0.0 and s.loss_ema == pytest.approx(0.0)
    s = reduce(s, SmoothingChanged(5))
    assert s.smoothing == 0.999


def test_non_finite_and_skipped_steps_do_not_poison_the_ema():
    s = reduce_all(CockpitState(), [started(), step(1, loss=1.0), step(2, loss=math.nan, skipped=True)])
    assert s.loss_ema == pytest.approx(1.0) and s.skipped_steps == 1 and s.history.total == 1


def test_checkpoint_rows_append_and_deduplicate():
    s = reduce(CockpitState(), started())
    a = CheckpointSaved(path="/out/x-step00000025.safetensors", step=25, epoch=1, bytes=1000, kind="step",
                        loss=0.5, verified=True)
    b = CheckpointSaved(path="/out/x-step00000030.safetensors", step=30, epoch=2, bytes=1000, kind="manual")
    s = reduce_all(s, [a, b, a])
    assert [r.step for r in s.checkpoints] == [30, 25]
    assert s.checkpoints[1].name == "x-step00000025.safetensors" and s.checkpoints[1].verified


def test_failure_and_start_failure_are_logged_one_line():
    s = reduce_all(CockpitState(), [started(), RunFinished(status="failed", step=3, error="out of\nmemory")])
    assert s.status == "failed" and s.log[-1].level == "error" and s.log[-1].message == "out of memory"
    s = reduce(s, StartRequested())
    assert s.running and s.error is None and s.log      # log kept across runs
    s = reduce(s, StartFailed("model not found"))
    assert s.status == "failed" and not s.running and s.log[-1].message == "model not found"


def test_the_log_keeps_the_latest_200_lines():
    s = reduce_all(CockpitState(), [LogMessage(level="warning", message=f"m{i}") for i in range(1000)])
    assert len(s.log) == 200 and s.log[-1].message == "m999"


def test_abort_clears_a_pending_pause():
    s = reduce_all(CockpitState(), [started(), PauseRequested(True), AbortRequested(save=True)])
    assert s.abort_requested and not s.pause_requested


def test_memory_history_and_pressure():
    samples = [MemorySample(device="cuda:0", rss=100, sys_used=50, sys_available=50, sys_total=100,
                            allocated=10 * i, reserved=90, peak=95, device_total=100) for i in range(100)]
    s = reduce_all(CockpitState(), samples)
    assert len(s.memory_history) == 60 and s.memory_history[-1] == 990
    assert memory_pressure(s.memory) == pytest.approx(0.9)
    assert memory_pressure(MemorySample(device="cpu", rss=1, sys_used=1, sys_available=25, sys_total=100)) \
        == pytest.approx(0.75)


def test_loss_history_stays_bounded_and_keeps_the_mean():
    h = LossHistory(capacity=64)
    for i in range(1, 10_001):
        h.append(i, float(i % 2))
    assert len(h) <= 64 and h.total == 10_000
    xs, ys, ns = h.series(16)
    assert len(xs) == 16 and xs[-1] == 10_000 and sum(ns) == 10_000
    assert sum(y * n for y, n in zip(ys, ns)) / sum(ns) == pytest.approx(0.5)


def test_smooth_accounts_for_points_standing_for_many_steps():
    assert smooth([1.0, 1.0], [1, 1], 0.9) == pytest.approx([1.0, 1.0])
    fine = smooth([2.0] + [0.0] * 10, [1] * 11, 0.9)[-1]
    coarse = smooth([2.0, 0.0], [1, 10], 0.9)[-1]
    assert coarse == pytest.approx(fine)


def test_reducing_a_million_steps_is_fast_enough_to_replay():
    s = reduce(CockpitState(), started(total=1_000_000))
    events = [StepCompleted(step=i, epoch=1, loss=1.0, lrs={}, step_seconds=0.1, t=float(i))
              for i in range(1, 50_001)]
    t0 = time.perf_counter()
    s = reduce_all(s, events)
    assert time.perf_counter() - t0 < 5.0
    assert len(s.history) <= s.history.capacity


def test_durations_read_as_minutes_and_seconds_or_hours():
    assert format_duration(None) == "--:--"
    assert format_duration(65) == "01:05"
    assert format_duration(3725) == "1:02:05"


def test_reducing_a_step_leaves_the_state_it_was_given_as_it_was():
    s = reduce_all(reduce(CockpitState(), started(total=10_000)),
                   [StepCompleted(step=i, epoch=1, loss=float(i), lrs={}, step_seconds=0.1, t=float(i))
                    for i in range(1, 5001)])
    before = (s.history.total, s.history.steps, s.history.sums, s.history.counts, s.loss_ema)
    a = reduce(s, StepCompleted(step=5001, epoch=1, loss=1.0, lrs={}, step_seconds=0.1, t=5001.0))
    b = reduce(s, StepCompleted(step=5001, epoch=1, loss=9.0, lrs={}, step_seconds=0.1, t=5001.0))
    b = reduce_all(b, [StepCompleted(step=i, epoch=1, loss=9.0, lrs={}, step_seconds=0.1, t=float(i))
                       for i in range(5002, 9001)])            # one branch grows on, through compactions
    assert (s.history.total, s.history.steps, s.history.sums, s.history.counts, s.loss_ema) == before
    assert a.history.total == 5001 and a.history.sums[-1] != b.history.sums[-1]
    assert sum(a.history.sums) == pytest.approx(sum(range(1, 5001)) + 1.0)
    assert sum(b.history.sums) == pytest.approx(sum(range(1, 5001)) + 9.0 * 4000)


# ---------------------------------------------------------------- validation, samples, log, resume
def saved(n, state_dir=None, path=None):
    return CheckpointSaved(path=path or f"/out/x-step{n:08d}.safetensors", step=n, epoch=1, bytes=2**20, kind="step",
                           loss=0.5, verified=True, state_dir=state_dir)


def validation(n, loss, checkpoint=None):
    return ValidationLoss(step=n, epoch=1, loss=loss, images=4, checkpoint=checkpoint)


def samples(n, count=3, checkpoint=None, errors=()):
    return SamplesSaved(step=n, epoch=1, paths=[f"/out/sample/x_{n:06d}_{i:02d}.png" for i in range(count)],
                        prompts=["p"] * count, seeds=[1] * count, errors=list(errors), checkpoint=checkpoint,
                        seconds=2.0)


def test_validation_loss_reaches_its_checkpoint_by_path_or_by_step_in_either_order():
    s = reduce_all(reduce(CockpitState(), started()), [
        validation(25, 0.30),                                       # before its checkpoint, matched by step
        saved(25),
        saved(50),
        validation(50, 0.20, checkpoint="/out/x-step00000050.safetensors"),   # after, matched by path
        validation(60, 0.10)])                                      # no checkpoint at 60: a chart point only
    assert [r.val_loss for r in s.checkpoints] == [0.30, 0.20]
    assert [(p.step, p.loss) for p in s.sample_book.validations] == [(25, 0.30), (50, 0.20), (60, 0.10)]
    assert best_validation(s).step == 50


def test_validation_named_for_another_checkpoint_at_the_same_step_is_not_counted_twice():
    s = reduce_all(reduce(CockpitState(), started()), [
        saved(50), saved(50, path="/out/x.safetensors"), validation(50, 0.2, checkpoint="/out/x.safetensors")])
    assert [r.val_loss for r in s.checkpoints] == [None, 0.2]


def test_samples_are_counted_per_checkpoint_and_failures_are_logged():
    s = reduce_all(reduce(CockpitState(), started()), [
        samples(25), saved(25), samples(25, 2, errors=["prompt 3: out of memory"]), saved(50),
        samples(50, checkpoint="/out/x-step00000050.safetensors"), samples(70)])
    assert [r.samples for r in s.checkpoints] == [5, 3]
    assert [(step, n) for step, _, n in s.sample_book.made] == [(25, 3), (25, 2), (50, 3), (70, 3)]
    assert s.sample_book.latest.images[0].path == "/out/sample/x_000070_00.png"
    warnings = [line.message for line in s.log if line.level == "warning"]
    assert warnings == ["sample failed: prompt 3: out of memory"]
    assert "samples: 3 images at step 70 (2.0 s)" == s.log[-1].message


def test_a_normal_run_fills_the_log_with_phases_saves_pauses_and_commands_once_each():
    s = reduce_all(CockpitState(), [
        started(), PhaseChanged(phase="loading", detail="/models/sd15"), PhaseChanged(phase="caching", detail="0/16"),
        PhaseChanged(phase="caching", detail="8/16"), PhaseChanged(phase="caching", detail="16/16"),
        PhaseChanged(phase="training"), step(1), PhaseChanged(phase="saving", detail="x"), saved(1),
        PhaseChanged(phase="training"), PauseRequested(True), PhaseChanged(phase="paused"), PauseRequested(False),
        PhaseChanged(phase="training"), SaveRequested(), PhaseChanged(phase="validating"), validation(1, 0.25),
        PhaseChanged(phase="training"), AbortRequested(save=False)])
    assert [line.message for line in s.log] == [
        "run r: 100 steps, 4 epochs on cpu", "loading (/models/sd15)", "caching latents (0/16)", "training",
        "saved x-step00000001.safetensors at step 1 (1.0 MiB, verified)", "pause requested at step 1",
        "paused at step 1", "resume requested at step 1", "resumed at step 1", "save requested at step 1",
        "validation", "validation loss 0.2500 at step 1 (4 images)", "abort requested at step 1 (stop without saving)"]


def test_resume_command_is_the_runs_own_config_with_the_newest_state():
    s = reduce_all(reduce(CockpitState(), started()), [saved(25, state_dir="/out/x-step00000025-state"),
                                                        saved(30, state_dir="/out/my runs/x-step00000030-state")])
    assert resume_command(s) is None                        # live: nothing to resume
    ended = reduce(s, RunFinished(status="aborted", step=30))       # a finish line without the engine's command
    assert resume_command(ended) == ("spyke-cockpit train --headless /out/.spyke/r/config.toml "
                                     "--resume '/out/my runs/x-step00000030-state'")
    named = "spyke-cockpit train --headless /out/.spyke/r/config.toml --resume /out/x-step00000031-state"
    assert resume_command(reduce(s, RunFinished(status="failed", step=31, resume_hint=named))) == named
    done = reduce_all(reduce(CockpitState(), started()), [saved(25, state_dir="/s"),
                                                           RunFinished(status="completed", step=100)])
    assert resume_command(done) is None
    no_state = reduce_all(reduce(CockpitState(), started()), [saved(25), RunFinished(status="aborted", step=25)])
    assert resume_command(no_state) is None


def test_learning_rates_keep_a_history_per_group():
    s = reduce_all(reduce(CockpitState(), started()), [
        StepCompleted(step=i, epoch=1, loss=1.0, lrs={"unet": 1e-4 * i, "text_encoder": 5e-5}, step_seconds=0.1,
                      t=float(i)) for i in range(1, 11)])
    lr = dict(s.lr_history)
    assert set(lr) == {"unet", "text_encoder"}
    assert lr["unet"].series(100)[1] == pytest.approx([1e-4 * i for i in range(1, 11)])
    assert lr["text_encoder"].total == 10


def test_a_sample_batch_logs_only_its_failed_prompts_and_counts_only_images_made():
    event = SamplesSaved(step=30, epoch=1, paths=["/out/sample/x_000030_00.png", ""], prompts=["a", "b"],
                         seeds=[1, 2], errors=["", "prompt 1: out of memory"], seconds=1.0)
    s = reduce_all(reduce(CockpitState(), started()), [saved(30), event])
    assert [line.message for line in s.log if line.level == "warning"] == ["sample failed: prompt 1: out of memory"]
    assert [r.samples for r in s.checkpoints] == [1]


def test_a_checkpoint_the_pruning_removed_stays_listed_as_removed_and_out_of_reach():
    from cockpit.panels import checkpoint_cells, checkpoint_columns
    from cockpit.samples import compare_rows
    from engine.api import CheckpointRemoved

    path = "/out/x-step00000025.safetensors"
    s = reduce_all(reduce(CockpitState(), started()), [
        saved(25), saved(50), samples(25),
        CheckpointRemoved(level="info", path=path, step=25, message=f"removing old checkpoint: {path}")])
    assert [(r.step, r.removed) for r in s.checkpoints] == [(25, True), (50, False)]
    assert s.log[-1].message == f"removing old checkpoint: {path}"
    columns = checkpoint_columns(s)
    cells = dict(checkpoint_cells(s, columns))
    verified = [key for key, _ in columns].index("verified")
    assert str(cells[path][verified]) == "removed" and "✔" in str(cells["/out/x-step00000050.safetensors"][verified])
    assert [r.name for r in compare_rows(s.sample_book, s.checkpoints)] == [
        "x-step00000025.safetensors (removed)", "x-step00000050.safetensors"]
