"""Which existing files in ``--output_dir`` a run may replace, decided before anything is written.

A file belongs to a run when its ``ss_session_id`` metadata (a state folder: its progress
``run_id``) is that run's id. Without ``--overwrite`` a run replaces only its own files: any
other file at a name it will write is refused, naming the file and the way out. Resuming a
finished run changes nothing when there is nothing left to train; re-training its last steps
from an earlier state with the same settings rewrites its own files (an exact resume gives the
same weights); continuing it further (or with changed settings, --resume_force) keeps the
earlier final under its step name (renamed atomically), or refuses with the command that would
keep it.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint import read_lora_metadata
from engine.io.atomic import fsync_dir
from engine.kohya.names import checkpoint_filename, state_dirname
from engine.config import TrainConfig
from engine.errors import CheckpointError, ConfigError
from engine.plan import RunPlan
from engine.run.written import moved_written, written_step
from engine.state import read_progress


@dataclass
class OutputCheck:
    finished: Path | None = None          # the run already finished here (its final file or state): train nothing
    finished_step: int | None = None
    renames: list[tuple[Path, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def finished_message(self) -> str:
        """What a run that has nothing left to train says (foreground and --detach alike)."""
        return (f"this run already finished at step {self.finished_step or 0}: {self.finished}; nothing changed "
                "(to train further, raise --max_train_steps and add --resume_force)")


def lora_step_of_run(path: Path, run_id: str) -> int | None:
    """The ``ss_steps`` of a LoRA file written by ``run_id``; None for any other or unreadable file.
    A ``.ckpt``/``.pt`` file has no metadata: the run folder's record says (``engine.run.written``)."""
    if Path(path).suffix.lower() in (".ckpt", ".pt"):
        return written_step(path, run_id)
    meta = read_lora_metadata(path)
    if not meta or not run_id or meta.get("ss_session_id") != run_id:
        return None
    try:
        return int(meta.get("ss_steps", ""))
    except ValueError:
        return None


def state_step_of_run(path: Path, run_id: str) -> int | None:
    """The global step of a state folder written by ``run_id``; None for any other or unreadable folder."""
    progress = read_progress(path)
    if not progress or not run_id or progress.get("run_id") != run_id:
        return None
    try:
        return int(progress.get("global_step"))
    except (TypeError, ValueError):
        return None


def names_to_write(cfg: TrainConfig, plan: RunPlan, start_step: int | None) -> tuple[list[str], list[str]]:
    """(checkpoint files, state folders) the run plans to write after ``start_step``."""
    files: list[str] = []
    states: list[str] = []
    for c in plan.checkpoints:
        if start_step is not None and c.kind != "final" and c.step <= start_step:
            continue
        files.append(c.filename)
        if cfg.save_state or (c.kind == "final" and cfg.save_state_on_train_end):
            state = state_dirname(cfg.output_name, None if c.kind == "final" else c.step)
            if state not in states:
                states.append(state)
    return files, states


def _keep_command(src: Path, out: Path, kept_name: str) -> str:
    return f"mv {shlex.quote(str(src))} {shlex.quote(str(out / kept_name))}"


def check_outputs(out: Path, cfg: TrainConfig, plan: RunPlan, run_id: str, start_step: int | None) -> OutputCheck:
    """Decide what the run may replace in ``out``; raises a one-line ConfigError when it would replace a
    file that is not its own. ``start_step`` is the resumed state's step (None for a fresh run)."""
    name = cfg.output_name
    final = out / checkpoint_filename(name, ext=cfg.save_model_as)
    final_state = out / state_dirname(name, None)
    check = OutputCheck()
    final_step = final_state_step = None
    if start_step is not None:
        final_step = lora_step_of_run(final, run_id)
        final_state_step = state_step_of_run(final_state, run_id)
        if start_step >= plan.total_steps and (final_step is not None or final_state_step is not None):
            check.finished = final if final_step is not None else final_state
            check.finished_step = final_step if final_step is not None else final_state_step
            return check
    if cfg.overwrite:
        return check
    files, states = names_to_write(cfg, plan, start_step)
    # Re-training the tail of a finished run from one of its earlier states, with its own settings, ends at
    # the same step with the same weights (resume is exact): its files are rewritten, nothing is lost.
    redo = start_step is not None and final_step is not None and final_step == plan.total_steps \
        and not cfg.resume_force
    if start_step is not None and not redo:
        _keep_earlier_final(check, out, name, run_id, files, states, final, final_step, final_state,
                            final_state_step)
    moved = {src for src, _ in check.renames}
    for filename in files:
        path = out / filename
        if path in moved or not path.exists() or lora_step_of_run(path, run_id) is not None:
            continue
        _refuse(out, filename, start_step, run_id)
    for dirname in states:
        path = out / dirname
        if path in moved or not path.exists() or state_step_of_run(path, run_id) is not None:
            continue
        _refuse(out, dirname, start_step, run_id)
    return check


def _refuse(out: Path, name: str, start_step: int | None, run_id: str) -> None:
    if start_step is None:
        raise ConfigError(f"--output_dir={out} already holds {name} from an earlier run; use another "
                          "--output_name or --output_dir, --resume latest to continue it, or --overwrite to replace it")
    raise ConfigError(f"--output_dir={out} already holds {name}, which is not from the run being resumed "
                      f"({run_id}); use another --output_name or --output_dir, or --overwrite to replace it")


def _keep_earlier_final(check: OutputCheck, out: Path, name: str, run_id: str, files: list[str],
                        states: list[str], final: Path, final_step: int | None, final_state: Path,
                        final_state_step: int | None) -> None:
    """The resumed run will write a new final: move this run's earlier final (and its state) to their step
    names, leave them where a file of the same step already keeps the same weights, or refuse."""
    kept: list[str] = []
    if final_step is not None:
        target = out / checkpoint_filename(name, step=final_step, ext=final.suffix[1:])
        if target.name not in files and not target.exists():
            check.renames.append((final, target))
            kept.append(f"kept the earlier final {final.name} (step {final_step}) as {target.name}")
        elif target.name not in files and _same_weights(final, target):
            kept.append(f"the earlier final {final.name} (step {final_step}) has the same weights as "
                        f"{target.name}, which stays")
        else:
            kept_name = f"kept-{checkpoint_filename(name, step=final_step, ext=final.suffix[1:])}"
            raise ConfigError(
                f"--output_dir={out} holds this run's final {final.name} (step {final_step}) and {target.name} is "
                f"taken, so the new final would replace it; keep it first with: "
                f"{_keep_command(final, out, kept_name)} — or add --overwrite to replace it")
    if final_state_step is not None:
        target = out / state_dirname(name, final_state_step)
        if target.name not in states and not target.exists():
            check.renames.append((final_state, target))
            kept.append(f"its state as {target.name}")
        elif target.name in states or state_step_of_run(target, run_id) != final_state_step:
            raise ConfigError(
                f"--output_dir={out} holds this run's final state {final_state.name} (step {final_state_step}) and "
                f"{target.name} is taken, so the new final state would replace it; keep it first with: "
                f"{_keep_command(final_state, out, 'kept-' + target.name)} — or add --overwrite to replace it")
    if kept:
        check.notes.append("this resume writes a new final: " + " and ".join(kept))


def _same_weights(a: Path, b: Path) -> bool:
    if a.suffix.lower() in (".ckpt", ".pt"):    # no hash in the file: the bytes (torch.save writes the same)
        return a.suffix == b.suffix and _file_sha256(a) == _file_sha256(b)
    meta_a, meta_b = read_lora_metadata(a) or {}, read_lora_metadata(b) or {}
    hash_a = meta_a.get("sshs_model_hash")
    return bool(hash_a) and hash_a == meta_b.get("sshs_model_hash") \
        and meta_a.get("ss_session_id") == meta_b.get("ss_session_id")


def _file_sha256(path: Path) -> str | None:
    import hashlib

    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def apply_renames(renames: list[tuple[Path, Path]], run_id: str = "") -> None:
    """Move each file/folder to its new name atomically and make the rename durable (a ``.ckpt``/``.pt``
    file's ownership record of ``run_id`` follows it)."""
    for src, dst in renames:
        if dst.exists():  # appeared since the check: never replace it
            raise ConfigError(f"{dst} appeared while keeping {src.name}; run again")
        try:
            os.replace(src, dst)
        except OSError as err:
            raise CheckpointError(f"could not keep {src} as {dst.name}: {err.strerror or err}") from None
        fsync_dir(dst.parent)
        if run_id and dst.suffix.lower() in (".ckpt", ".pt"):
            moved_written(src, dst, run_id)


def refuse_foreign(path: Path, run_id: str, *, state: bool = False) -> None:
    """Before a save: refuse to replace a file (or state folder) that another run wrote."""
    if not path.exists():
        return
    owned = state_step_of_run(path, run_id) if state else lora_step_of_run(path, run_id)
    if owned is None:
        raise CheckpointError(f"not saving {path}: it is not from this run ({run_id}); move it away "
                              "or add --overwrite to replace it")
