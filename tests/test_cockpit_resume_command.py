"""The resume command the cockpit shows after an abort is a real command: run as it is, it resumes."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from cockpit.state import CockpitState, reduce_all, resume_command
from engine.control import TrainingControl
from engine.events import RunFinished, StepCompleted


def test_resume_command_shown_after_an_abort_runs_and_finishes_the_run(tiny_cache, tmp_path):
    from engine.demo import prepare_demo
    from engine.trainer import Trainer

    out = tmp_path / "out dir"
    config = prepare_demo(root=tiny_cache, output_root=tmp_path, output_dir=str(out), max_train_steps=4,
                          max_train_epochs=None, save_every_n_steps=2, save_state=True, seed=7,
                          gradient_checkpointing=False).validate()
    events: list = []
    control = TrainingControl()

    def sink(event) -> None:
        events.append(event)
        if isinstance(event, StepCompleted) and event.step == 2:
            control.abort(save=True)

    result = Trainer(config, control=control, sinks=[sink]).run()
    assert result.status == "aborted", result.error
    state = reduce_all(CockpitState(), events)
    command = resume_command(state)
    assert command is not None and "[your config and flags]" not in command
    args = shlex.split(command)
    assert args[:3] == ["spyke-cockpit", "train", "--headless"] and Path(args[3]).is_file()
    exe = Path(sys.executable).parent / "spyke-cockpit"
    done = subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 3/4" in done.stdout and "finished: completed at step 4" in done.stdout, done.stdout
    assert (out / f"{config.output_name}.safetensors").is_file()
    assert not any(isinstance(e, RunFinished) and e.status == "failed" for e in events)
