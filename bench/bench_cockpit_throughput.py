"""Steps/s with the cockpit live vs headless, same job (goal: ratio >= 0.98). Run by hand.

    .venv/bin/python bench/bench_cockpit_throughput.py [--steps 80] [--repeats 2]
    .venv/bin/python bench/bench_cockpit_throughput.py --samples [--steps 80] [--repeats 2]

``--samples``: the cockpit with the samples panel showing three sample images (made at the start,
``--sample_at_first``; at 120x50 the panel shows itself) vs the same run with the panel hidden (``i``), instead of cockpit vs headless.

Each repeat runs the demo job headless, then the same job in the cockpit (`demo --autostart`
inside a private tmux server at 120x40), and reads the per-step seconds from each run's
events.jsonl (the first 8 steps are warm-up). Needs tmux.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXE = ROOT / ".venv" / "bin" / "spyke-cockpit"
sys.path.insert(0, str(ROOT))

from engine.events import RunFinished, SamplesSaved, StepCompleted  # noqa: E402
from engine.run.journal import read_events  # noqa: E402
from engine.run.registry import find_run_dirs  # noqa: E402


def step_times(out: Path, warmup: int) -> list[float]:
    (run,) = find_run_dirs(out)
    events = read_events(run / "events.jsonl")
    assert any(isinstance(e, RunFinished) and e.status == "completed" for e in events), "run did not complete"
    return [e.step_seconds for e in events if isinstance(e, StepCompleted)][warmup:]


def flags(steps: int, out: Path) -> list[str]:
    return [f"--max_train_steps={steps}", "--max_train_epochs=", "--save_every_n_steps=100000", f"--output_dir={out}"]


def run_headless(steps: int, out: Path, env: dict) -> None:
    subprocess.run([str(EXE), "demo", "--headless", *flags(steps, out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def samples_flags(work: Path) -> list[str]:
    prompts = work / "prompts.txt"
    prompts.write_text("spyke, a cat --w 64 --h 64 --s 2 --d 1\nspyke, a dog --w 64 --h 64 --s 2 --d 2\n"
                       "spyke, a bird --w 64 --h 64 --s 2 --d 3\n")
    return [f"--sample_prompts={prompts}", "--sample_at_first"]


def journal_has(out: Path, event_type: str) -> bool:
    """Whether the run's events.jsonl holds an event of this type: a byte search, so that polling while the
    cockpit trains costs the bench almost no CPU (parsing the whole journal each second did)."""
    runs = find_run_dirs(out) if out.exists() else []
    return bool(runs) and f'"type":"{event_type}"'.encode() in (runs[0] / "events.jsonl").read_bytes()


def run_cockpit(steps: int, out: Path, env: dict, extra: list[str] = (), hide_samples: bool = False) -> None:
    sock = f"spyke-bench-{os.getpid()}"
    cmd = " ".join([str(EXE), "demo", "--autostart", *flags(steps, out), *extra])
    subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-x", "120", "-y", "50" if extra else "40",
                    f"env -u COLUMNS -u LINES SPYKE_CACHE={env['SPYKE_CACHE']} {cmd}"], check=True)
    try:
        deadline = time.monotonic() + 30 * 60
        hidden = not hide_samples
        while time.monotonic() < deadline:
            if not hidden and journal_has(out, SamplesSaved.type):
                time.sleep(0.5)                  # the panel shows itself on the first sample set (50 rows)
                subprocess.run(["tmux", "-L", sock, "send-keys", "i"], check=False)
                hidden = True
            if journal_has(out, RunFinished.type):
                break
            time.sleep(0.2 if not hidden else 1.0)
        subprocess.run(["tmux", "-L", sock, "send-keys", "q"], check=False)
        time.sleep(2.0)
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], check=False, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", action="store_true", help="samples panel visible vs hidden instead")
    args = ap.parse_args()
    if not shutil.which("tmux"):
        sys.exit("needs tmux")
    work = Path(tempfile.mkdtemp(prefix="spyke-bench-"))
    env = dict(os.environ, SPYKE_CACHE=str(work / "cache"))
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    subprocess.run([str(EXE), "demo", "--headless", *flags(2, work / "warm")], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    if args.samples:
        extra = samples_flags(work)
        base = ("samples panel hidden", lambda out: run_cockpit(args.steps, out, env, extra, hide_samples=True))
        other = ("samples panel visible", lambda out: run_cockpit(args.steps, out, env, extra))
    else:
        base = ("headless", lambda out: run_headless(args.steps, out, env))
        other = ("cockpit", lambda out: run_cockpit(args.steps, out, env))
    times: dict[str, list[float]] = {base[0]: [], other[0]: []}
    pairs: list[float] = []
    for i in range(args.repeats):
        medians = []
        for k, (name, run) in enumerate((base, other)):
            run(work / f"r{i}-{k}")
            these = step_times(work / f"r{i}-{k}", args.warmup)
            times[name] += these
            medians.append(statistics.median(these))
        pairs.append(medians[0] / medians[1])
        print(f"pair {i + 1}: {base[0]} {medians[0] * 1000:.1f} ms/step, {other[0]} {medians[1] * 1000:.1f} ms/step, "
              f"ratio {pairs[-1]:.3f}", flush=True)
    b, o = statistics.median(times[base[0]]), statistics.median(times[other[0]])
    for name, t in ((base[0], b), (other[0], o)):
        print(f"{name}: median {t * 1000:.1f} ms/step ({1 / t:.2f} steps/s) over {len(times[name])} steps")
    print(f"{other[0]}/{base[0]} steps/s ratio: {b / o:.3f}  (goal >= 0.98); median of the pairs' ratios "
          f"{statistics.median(pairs):.3f} (range {min(pairs):.3f}-{max(pairs):.3f})")
    shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
