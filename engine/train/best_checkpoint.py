"""The best-validation checkpoint: the file of this run with the lowest validation loss so far, which
``--save_last_n_*`` pruning keeps when it falls out of the window.

The record lives in the run folder (``best_validation.json``, written atomically) so a resumed run
(same run id, same folder) still knows it. Only one file is ever kept this way: when a later file
validates lower, the one kept out of the window goes, as pruning would have removed it. A record
from after the step a run resumes at is dropped: those steps are trained again and validated again.
Light: no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.io.atomic import write_file

BEST_FILE = "best_validation.json"


@dataclass
class Best:
    file: str            # the checkpoint's name in --output_dir
    step: int
    loss: float
    held: bool = False   # pruning kept it out of its window because of this record

    def why(self) -> str:
        return f"it has the best validation loss so far ({self.loss:.6g}, step {self.step})"


class BestCheckpoint:
    """The lowest validation loss of this run's checkpoints; ``path``: its record in the run folder
    (None: kept in memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.best: Best | None = self._read()

    def _read(self) -> Best | None:
        if self.path is None:
            return None
        try:
            raw = json.loads(self.path.read_text())
            best = Best(file=str(raw["file"]), step=int(raw["step"]), loss=float(raw["loss"]),
                        held=bool(raw.get("held", False)))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return best if math.isfinite(best.loss) else None

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            if self.best is None:
                self.path.unlink(missing_ok=True)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_file(self.path, json.dumps(asdict(self.best)).encode())
        except OSError:
            pass   # the record only widens what pruning keeps; a run never fails over it

    def resumed_at(self, step: int) -> None:
        """A resume from ``step``: a record of a later step no longer holds (that step is trained again)."""
        if self.best is not None and self.best.step > step:
            self.best = None
            self._write()

    def protects(self, name: str) -> Best | None:
        """The record when ``name`` is the best-validation checkpoint, else None."""
        return self.best if self.best is not None and self.best.file == name else None

    def hold(self) -> None:
        """Pruning kept the best file out of its window."""
        if self.best is not None and not self.best.held:
            self.best.held = True
            self._write()

    def validated(self, name: str, step: int, loss: float) -> Best | None:
        """A checkpoint's validation loss. Returns the former best when it was kept out of the pruning
        window and is no longer the best (the caller removes it), else None."""
        if not math.isfinite(loss):
            return None
        if self.best is not None and self.best.file == name:
            if self.best.step == step:
                self.best.loss = min(self.best.loss, loss)
                self._write()
                return None
        elif self.best is not None and loss >= self.best.loss:
            return None
        former = self.best
        self.best = Best(file=name, step=step, loss=loss)
        self._write()
        return former if former is not None and former.held and former.file != name else None
