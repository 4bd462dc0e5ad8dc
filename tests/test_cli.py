"""The `spyke-cockpit` command as a user runs it (subprocesses): the headless demo, flags
over TOML, and bad input answered with one clear line, never a traceback, never
overwriting an earlier checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "spyke-cockpit"
if not EXE.exists():
    EXE = REPO / ".venv" / "bin" / "spyke-cockpit"


@pytest.fixture(scope="session")
def cli_assets(tmp_path_factory, tiny_cache):
    """A demo cache (tiny model + demo dataset) and a 4-image 64 px dataset."""
    from engine.tiny import generate_dataset

    cache = tiny_cache
    small = generate_dataset(tmp_path_factory.mktemp("cli_small"), num_images=4, num_repeats=1, resolution=64, seed=5)
    return {"cache": cache, "model": cache / "tiny-sd15", "small": small}


def env_for(cache: Path) -> dict:
    env = dict(os.environ)
    env["SPYKE_CACHE"] = str(cache)
    env.pop("PYTHONWARNINGS", None)
    return env


def start(args, cwd: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([str(EXE), *map(str, args)], cwd=cwd, env=env_for(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(args, cwd: Path, cache: Path, timeout: float = 180) -> tuple[int, str, str]:
    return finish(start(args, cwd, cache), timeout)


def error_lines(out: str, err: str) -> list[str]:
    return [l for l in (out + err).splitlines() if re.match(r"^(spyke-cockpit: )?error:", l)]


def train_args(assets, out_dir: Path, *extra) -> list[str]:
    return ["train", "--headless", f"--pretrained_model_name_or_path={assets['model']}",
            f"--dataset_config={assets['small'].dataset_toml}", f"--output_dir={out_dir}", "--resolution=64",
            "--max_train_steps=2", "--output_name=cli", "--network_dim=4", "--seed=1", *extra]


def test_demo_headless_trains_and_flags_override_the_preset(cli_assets, tmp_path):
    # configs/demo.toml says network_dim 8 and save_every_n_steps 40: the command line wins.
    code, out, err = run(["demo", "--headless", f"--dataset_config={cli_assets['small'].dataset_toml}",
                          "--max_train_epochs=1", "--save_every_n_steps=2", "--network_dim=4"],
                         tmp_path, cli_assets["cache"])
    assert code == 0, out + err
    assert "Traceback" not in out + err
    steps = re.findall(r"^step (\d+)/(\d+) \| epoch (\d+)/(\d+) \| loss (\S+) \| lr \S+ \| [\d.]+ it/s \| ETA \S+$",
                       out, re.M)
    assert [(int(s), int(t)) for s, t, *_ in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(float(loss) > 0 for *_, loss in steps)
    ckpts = re.findall(r"^checkpoint \((\w+)\) step (\d+): (\S+\.safetensors) ", out, re.M)
    assert [(k, int(s)) for k, s, _ in ckpts] == [("step", 2), ("step", 4), ("final", 4)]
    final = Path(ckpts[-1][2])
    assert final.name == "spyke_demo.safetensors" and final.exists()
    assert final.is_relative_to(tmp_path / "spyke-demo-output")        # demo output under the cwd
    assert "finished: completed at step 4" in out
    assert re.search(r"^LoRA: [1-9]\d* U-Net modules, [1-9]\d* text-encoder modules, dim 4, alpha 4$", out, re.M), out
    from engine.checkpoint import read_lora_file

    _, meta = read_lora_file(final)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"   # alpha still from the preset

    # a second run into the same folder with the same name refuses; the first files stay byte-identical
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in final.parent.glob("*.safetensors")}
    code, out, err = run(["train", "--headless", f"--pretrained_model_name_or_path={cli_assets['model']}",
                          f"--dataset_config={cli_assets['small'].dataset_toml}", f"--output_dir={final.parent}",
                          "--output_name=spyke_demo", "--max_train_steps=2", "--save_every_n_steps=2"],
                         tmp_path, cli_assets["cache"])
    assert code != 0
    lines = error_lines(out, err)
    assert len(lines) == 1 and "spyke_demo-step00000002.safetensors" in lines[0] and "--output_name" in lines[0], \
        out + err
    assert "Traceback" not in out + err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in final.parent.glob("*.safetensors")} == before


BAD_INPUT = {
    # name: (argv builder, expected exit code, text the one error line must contain)
    "unknown flag": (lambda a, t: ["train", "--headless", "--netwrok_dim=8"], 2, "--netwrok_dim"),
    "unknown demo flag": (lambda a, t: ["demo", "--headless", "--bogus"], 2, "--bogus"),
    "wrong type": (lambda a, t: train_args(a, t / "o") + ["--network_dim=abc"], 2, "network_dim"),
    "dim 0": (lambda a, t: train_args(a, t / "o") + ["--network_dim=0"], 2, "network_dim"),
    "bad choice": (lambda a, t: train_args(a, t / "o") + ["--lr_scheduler=sometimes"], 2, "lr_scheduler"),
    "missing toml": (lambda a, t: ["train", "--headless", str(t / "nope.toml")], 2, "nope.toml"),
    "dataset toml as the preset": (lambda a, t: ["train", "--headless", str(a["small"].dataset_toml)], 2,
                                   "this is a kohya dataset config; pass it as --dataset_config="),
    "missing model": (lambda a, t: train_args(a, t / "o") + [f"--pretrained_model_name_or_path={t / 'no_model'}"],
                      1, "no_model"),
    "missing image dir": (lambda a, t: train_args(a, t / "o") + [f"--dataset_config={t / 'missing_dir.toml'}"],
                          1, "missing_images"),
    "empty image dir": (lambda a, t: train_args(a, t / "o") + [f"--dataset_config={t / 'empty_dir.toml'}"],
                        1, "empty_images"),
    "corrupt image": (lambda a, t: train_args(a, t / "o") + [f"--dataset_config={t / 'corrupt.toml'}"],
                      1, "broken.png"),
    "output name too long": (lambda a, t: train_args(a, t / "o") + ["--output_name=" + "n" * 240], 2,
                             "--output_name is 240 characters long; use at most"),
    "output dir under a file": (lambda a, t: train_args(a, Path("/etc/passwd/x")), 1, "/etc/passwd/x"),
    "a value after a switch": (lambda a, t: train_args(a, t / "o") + ["--xformers", "true"], 2,
                               "--xformers is a switch and takes no value (got 'true')"),
    "an optimizer that cannot train": (lambda a, t: train_args(a, t / "o") + ["--optimizer_type=SparseAdam"], 2,
                                       "--optimizer_type 'SparseAdam' cannot train a LoRA"),
    "a Windows command to import": (lambda a, t: ["import-kohya", t / "windows.cmd"], 2,
                                    "--network_dim: line 1 ends in '^', a Windows cmd line continuation"),
}


def _bad_datasets(tmp: Path) -> None:
    from PIL import Image

    def toml(name: str, folder: Path, class_tokens: bool = True) -> None:
        (tmp / name).write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"{folder}\"\n"
                                + ('class_tokens = "spyke"\n' if class_tokens else ""))

    toml("missing_dir.toml", tmp / "missing_images")
    (tmp / "empty_images").mkdir()
    (tmp / "empty_images" / "notes.txt").write_text("no images here")
    toml("empty_dir.toml", tmp / "empty_images")
    (tmp / "corrupt").mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp / "corrupt" / "fine.png")
    (tmp / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    toml("corrupt.toml", tmp / "corrupt")
    (tmp / "windows.cmd").write_text("accelerate launch train_network.py ^\r\n  --network_dim=8 ^\r\n  --seed=1\r\n")


def test_bad_input_is_one_clear_line_never_a_traceback(cli_assets, tmp_path):
    _bad_datasets(tmp_path)
    procs = {}
    for name, (argv, _, _) in BAD_INPUT.items():     # all at once: most fail before torch loads
        cwd = tmp_path / re.sub(r"\W", "_", name)
        cwd.mkdir()
        procs[name] = start(argv(cli_assets, tmp_path), cwd, cli_assets["cache"])
    failures = []
    for name, proc in procs.items():
        code, out, err = finish(proc)
        _, want_code, needle = BAD_INPUT[name]
        lines = error_lines(out, err)
        ok = (code == want_code and "Traceback" not in out + err and len(lines) == 1 and needle in lines[0]
              and len(err.strip().splitlines()) <= 1)
        if not ok:
            failures.append(f"{name}: exit {code}\n--- stdout\n{out}\n--- stderr\n{err}")
    assert not failures, "\n\n".join(failures)
    # a bad dataset never leaves an output folder behind
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.safetensors"))


def test_help_lists_kohya_flags(cli_assets, tmp_path):
    code, out, err = run(["train", "--help"], tmp_path, cli_assets["cache"])
    assert code == 0
    for flag in ("--pretrained_model_name_or_path", "--network_dim", "--text_encoder_lr", "--save_every_n_steps",
                 "--gradient_checkpointing", "--clip_skip", "--min_snr_gamma"):
        assert flag in out


DETACH_REFUSALS = {
    # name: (extra flags, text the one error line must contain)
    "missing dataset": (lambda t: [f"--dataset_config={t / 'nope.toml'}"], "nope.toml"),
    "bad value": (lambda t: ["--network_dim=0"], "--network_dim"),
    "missing model": (lambda t: [f"--pretrained_model_name_or_path={t / 'no_model'}"], "no_model: not found"),
    "clip_skip too deep": (lambda t: ["--clip_skip=9"], "--clip_skip=9: the text encoder has 5 layers; use 1..5"),
    "no state to resume": (lambda t: ["--resume=latest"], "--resume latest: no 'cli-*-state' folder"),
    "state folder missing": (lambda t: [f"--resume={t / 'gone-state'}"], "gone-state: not a spyke-cockpit state"),
    "output dir under a file": (lambda t: [f"--output_dir={t / 'a-file' / 'out'}"], "not writable"),
}


def test_detach_refuses_what_a_foreground_run_would_before_starting_anything(cli_assets, tmp_path):
    (tmp_path / "a-file").write_text("")
    procs = {}
    for name, (extra, _) in DETACH_REFUSALS.items():
        out_dir = tmp_path / re.sub(r"\W", "_", name)
        args = [a for a in train_args(cli_assets, out_dir, *extra(tmp_path)) if a != "--headless"]
        procs[name] = (out_dir, start([*args, "--detach"], tmp_path, cli_assets["cache"]))
    failures = []
    for name, (out_dir, proc) in procs.items():
        code, out, err = finish(proc, timeout=120)
        needle = DETACH_REFUSALS[name][1]
        ok = (code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("spyke-cockpit: error: ")
              and needle in err and not out_dir.exists())          # nothing started, no run folder written
        if not ok:
            failures.append(f"{name}: exit {code}\n--- stdout\n{out}\n--- stderr\n{err}")
    assert not failures, "\n\n".join(failures)


def test_detach_refuses_to_replace_an_earlier_runs_checkpoint(cli_assets, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "cli.safetensors").write_bytes(b"an earlier run's weights")
    args = [a for a in train_args(cli_assets, out_dir) if a != "--headless"]
    code, out, err = run([*args, "--detach"], tmp_path, cli_assets["cache"], timeout=120)
    assert (code, out) == (2, "") and len(err.splitlines()) == 1, out + err
    assert "already holds cli.safetensors" in err and "--overwrite" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["cli.safetensors"]
    assert (out_dir / "cli.safetensors").read_bytes() == b"an earlier run's weights"


def test_train_detach_returns_at_once_and_the_run_trains_in_its_own_session(cli_assets, tmp_path):
    import json
    import os
    import time

    out_dir = tmp_path / "out"
    args = [a for a in train_args(cli_assets, out_dir, "--max_train_steps=6") if a != "--headless"]
    started = time.monotonic()
    code, out, err = run([*args, "--detach"], tmp_path, cli_assets["cache"], timeout=60)
    assert code == 0, out + err
    assert time.monotonic() - started < 30, "--detach waited for the training"
    m = re.search(r"watch:\s+spyke-cockpit attach (\S+)", out)
    assert m, out
    run_dir = Path(m.group(1))
    events = run_dir / "events.jsonl"
    deadline = time.monotonic() + 120
    pid = None
    while time.monotonic() < deadline:
        records = [json.loads(l) for l in events.read_text().splitlines() if l.strip()] if events.exists() else []
        if pid is None and records and records[0]["type"] == "run_started":
            pid = records[0]["pid"]
            try:   # a new session: the terminal's SIGHUP cannot reach it
                assert os.getsid(pid) != os.getsid(0)
            except ProcessLookupError:
                pass
        if any(r["type"] == "finished" for r in records):
            break
        time.sleep(0.3)
    finished = next(r for r in records if r["type"] == "finished")
    assert finished["status"] == "completed" and finished["step"] == 6, finished
    assert (out_dir / "cli.safetensors").is_file()
    assert "finished: completed at step 6" in (run_dir / "console.log").read_text()


def test_detach_on_a_finished_run_says_so_and_changes_nothing(cli_assets, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(train_args(cli_assets, out_dir, "--save_state"), tmp_path, cli_assets["cache"])
    assert code == 0, out + err
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    args = [a for a in train_args(cli_assets, out_dir, "--save_state", "--resume=latest") if a != "--headless"]
    code, out, err = run([*args, "--detach"], tmp_path, cli_assets["cache"], timeout=120)
    assert (code, err) == (0, ""), out + err
    assert out.startswith("this run already finished at step 2: ") and "nothing changed" in out, out
    assert "started run" not in out
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    assert after == before


# ---------------------------------------------------------------------------- help and the everyday flags
def test_top_level_help_is_an_overview_of_every_command_and_the_everyday_flags(capsys):
    from cockpit.cli import COMMANDS, main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for command in COMMANDS:
        assert sum(l.startswith(f"  spyke-cockpit {command} ") for l in lines) == 1, command
    for flag in ("--detach", "--root DIR", "--read-only", "--refresh SECONDS", "--port PORT", "--headless"):
        assert any(l.startswith(f"  {flag} ") for l in lines), flag
    assert "``" not in text and "importing this module" not in text.lower()   # no developer notes, no RST
    assert "COMMAND --help" in lines[-2] and "README" in lines[-1]


def test_every_option_of_every_command_has_help():
    from cockpit.cli import COMMANDS, parsers

    built = parsers()
    assert set(COMMANDS) | {""} == set(built)
    missing = [f"{name or 'spyke-cockpit'} {action.option_strings or action.dest}"
               for name, build in built.items() for action in build()._actions
               if not (action.help or "").strip() or action.help == "==SUPPRESS=="]
    assert not missing, missing


def write_finished_run(out_dir: Path, run_id: str = "a-run") -> Path:
    from engine.events import RunFinished, RunStarted

    run_dir = out_dir / ".spyke" / run_id
    run_dir.mkdir(parents=True)
    events = [RunStarted(run_id=run_id, output_dir=str(out_dir), output_name="a", total_steps=1, num_epochs=1,
                         batches_per_epoch=1, device="cpu", pid=1, config={}),
              RunFinished(status="completed", step=1)]
    (run_dir / "events.jsonl").write_text("".join(e.to_json() + "\n" for e in events))
    return run_dir


def test_ls_root_lists_the_runs_under_that_folder(tmp_path, monkeypatch, capsys):
    from cockpit.ls import main as ls_main
    from engine.errors import SpykeError

    write_finished_run(tmp_path / "runs" / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert ls_main([]) == 0
    assert capsys.readouterr().out.startswith("no runs under ")
    assert ls_main(["--root", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["RUN", "STATE"] and table[1].split()[:2] == ["a-run", "finished"], table
    with pytest.raises(SpykeError, match="give FOLDER or --root DIR"):
        ls_main([str(elsewhere), "--root", str(tmp_path / "runs")])


def test_demo_detach_trains_the_demo_in_the_background_and_says_how_to_watch_it(cli_assets, tmp_path):
    import json
    import time

    code, out, err = run(["demo", "--detach", f"--dataset_config={cli_assets['small'].dataset_toml}",
                          "--resolution=64", "--max_train_epochs=1", "--network_dim=4"], tmp_path, cli_assets["cache"],
                         timeout=120)
    assert code == 0, out + err
    assert re.search(r"^started run \S+ \(pid \d+\) in the background$", out, re.M), out
    watch = re.search(r"^  watch:   spyke-cockpit attach (\S+)$", out, re.M)
    listing = re.search(r"^  list:    spyke-cockpit ls (\S+)$", out, re.M)
    assert watch and listing, out
    run_dir, out_dir = Path(watch.group(1)), Path(listing.group(1))
    assert out_dir.is_relative_to(tmp_path / "spyke-demo-output") and run_dir.is_relative_to(out_dir)
    events = run_dir / "events.jsonl"
    deadline = time.monotonic() + 120
    records: list = []
    while time.monotonic() < deadline and not any(r["type"] == "finished" for r in records):
        records = [json.loads(l) for l in events.read_text().splitlines() if l.strip()] if events.exists() else []
        time.sleep(0.3)
    finished = next(r for r in records if r["type"] == "finished")
    assert finished["status"] == "completed" and finished["step"] == 4, finished     # 4 images x 1 epoch
    assert (out_dir / "spyke_demo.safetensors").is_file()


@pytest.mark.parametrize("argv, needle", [(["import-kohya"], "required: FILE|-"),
                                          (["export-kohya", "a.toml", "b.toml"], "unrecognized arguments: b.toml")])
def test_import_and_export_kohya_usage_errors_are_one_line(argv, needle, capsys):
    from cockpit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spyke-cockpit: error: ") and needle in err and err.count("\n") == 1, err
