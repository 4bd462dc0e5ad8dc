"""The step loop: epochs of batch groups, the control between steps (pause, save, abort), the
NaN policy, step events and memory samples, and the saves the plan schedules
(``RunPlan.checkpoint_at``), then the final file."""

from __future__ import annotations

import time
from pathlib import Path

from engine.devices import read_memory
from engine.events import LogMessage, MemorySample, PhaseChanged, StepCompleted
from engine.train.nan_policy import grad_norm
from engine.train.readout import finish_read
from engine.train.validation import Validator

MEMORY_SAMPLE_SECONDS = 2.0


def memory_sample(device_type: str) -> MemorySample:
    m = read_memory(device_type)
    return MemorySample(device=m.device, rss=m.rss, sys_used=m.sys_used, sys_available=m.sys_available,
                        sys_total=m.sys_total, allocated=m.allocated, reserved=m.reserved, peak=m.peak,
                        device_total=m.device_total, swap_used=m.swap_used)


def scheduled_lrs(names: list[str], param_groups) -> tuple[dict[str, float], dict[str, float] | None]:
    """After the optimizer and schedule stepped: each group's learning rate, and its ``d × lr`` when the
    optimizer adapts a step size ``d`` (D-Adaptation, Prodigy), as kohya's trackers read them."""
    lrs = {name: float(g["lr"]) for name, g in zip(names, param_groups)}
    if not all("d" in g for g in param_groups):
        return lrs, None
    return lrs, {name: float(g["d"]) * float(g["lr"]) for name, g in zip(names, param_groups)}


class Loop:
    """Runs an assembled ``engine.train.job.Job`` (its parts, counters, control and emitter) to the end."""

    def __init__(self, job) -> None:
        self.job = job
        self._last_mem = 0.0

    def _phase(self, phase: str, detail: str = "") -> None:
        self.job.emit(PhaseChanged(phase=phase, detail=detail))

    def _sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_mem >= MEMORY_SAMPLE_SECONDS:
            self._last_mem = now
            self.job.emit(memory_sample(self.job.device_type))

    def run(self) -> tuple[Path | None, str]:
        job = self.job
        cfg, plan, c, saver, nan, step_fn = job.cfg, job.plan, job.counters, job.saver, job.nan, job.step
        sampler = job.sampler
        optimizer, lr_scheduler = job.optimizer, job.lr_scheduler
        if cfg.cache_latents or cfg.cache_latents_to_disk:
            step_fn.cache_latents(self._phase)
        self._phase("training")
        accum = cfg.gradient_accumulation_steps
        poll = job.channel.poll if job.channel is not None else None
        validator = Validator(job)

        def on_pause(entering: bool) -> None:
            self._phase("paused" if entering else "training")
            if entering:
                self._sample(force=True)

        def on_save() -> None:
            saved = saver.save("manual", then="paused")     # a save inside a pause: still paused after it
            validator.at_checkpoint(c.global_step, c.current_epoch(plan.num_epochs), saved, then="paused")
            sampler.for_checkpoint(saved, previous="paused")

        def on_sample() -> None:
            sampler.on_request(previous="paused")

        self._last_mem = 0.0
        sampler.at_start()
        groups: list = []
        groups_epoch = None
        while c.global_step < plan.total_steps and c.epoch < plan.num_epochs:
            if groups_epoch != c.epoch:
                batches = plan.dataset.epoch_batches(c.epoch, job.seed)
                groups = [batches[i:i + accum] for i in range(0, len(batches), accum)]
                groups_epoch = c.epoch
            decision = job.control.between_steps(on_pause, on_save, poll, on_sample=on_sample)
            if decision.save_now and not decision.abort:
                saved = saver.save("manual")
                validator.at_checkpoint(c.global_step, c.current_epoch(plan.num_epochs), saved)
                sampler.for_checkpoint(saved)
            if decision.sample_now and not decision.abort:
                sampler.on_request()
            if decision.abort:
                return self._abort(decision.abort_save)
            step_started = time.perf_counter()
            step = c.global_step + 1
            job.oom.step_starts()                    # where an out-of-memory stop rewinds to
            got = step_fn.forward_backward(groups[c.batch_in_epoch], step, job.loss_hook, epoch=c.epoch + 1,
                                           read_last=cfg.mixed_precision == "fp16")
            loss_value, nonfinite = got.value, got.nonfinite
            if nonfinite is None:               # one host read: the last loss and the gradient norm together
                loss_value, nonfinite = finish_read(got, grad_norm(cfg, job.params, job.accelerator))
            skipped = False
            if nonfinite is not None:
                optimizer.zero_grad(set_to_none=True)
                if nan.on_nonfinite(step, nonfinite) == "rollback":
                    continue
                skipped = True
                loss_value = float("nan")
            else:
                nan.finite_step()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            norms = (None, None, None)
            if cfg.scale_weight_norms and job.max_norm_supported:   # kohya: after the optimizer step, each step
                norms = job.network.apply_max_norm(cfg.scale_weight_norms, job.device)
            lrs, _ = scheduled_lrs(job.group_names, optimizer.param_groups)    # the rates this step trained with
            lr_scheduler.step()
            next_lrs, d_lrs = scheduled_lrs(job.group_names, optimizer.param_groups)
            epoch_number = c.epoch + 1
            epoch_ended = c.finish_step(loss_value, len(groups))
            job.emit(StepCompleted(step=step, epoch=epoch_number, loss=loss_value, lrs=lrs,
                                   step_seconds=time.perf_counter() - step_started, skipped=skipped,
                                   keys_scaled=norms[0], avg_key_norm=norms[1], max_key_norm=norms[2],
                                   next_lrs=next_lrs, d_lrs=d_lrs))
            self._sample()
            saved = [saver.save(planned.kind)           # step files, then epoch files (never at the last epoch)
                     for planned in plan.checkpoint_at(step) if planned.kind != "final"]
            validator.after_step(step, epoch_number, epoch_ended, saved)
            last_saved = next((p for p in reversed(saved) if p), None)
            sampler.after_step(step, epoch_ended=epoch_number if epoch_ended else None, checkpoint=last_saved)
        final = saver.save("final")
        validator.at_checkpoint(c.global_step, c.current_epoch(plan.num_epochs), final, then="finished")
        sampler.for_checkpoint(final, previous="finished")
        return final, "completed"

    def _abort(self, save: bool) -> tuple[Path | None, str]:
        job = self.job
        path = None
        if save and job.counters.global_step > 0:
            path = job.saver.save("abort", with_state=True)
        elif save:
            job.saver.save_training_state()
        job.emit(LogMessage(level="info", message=f"aborted at step {job.counters.global_step}" + (
            f"; saved {path}" if path else "")))
        return path, "aborted"
