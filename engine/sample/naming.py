"""kohya's sample image file names, both ways.

kohya (``sample_image_inference``) saves each image as
``<output_dir>/sample/<output_name>_<num>_<i:02d>_<timestamp>[_<seed>].png`` where

* ``<num>`` is ``e{epoch:06d}`` when sampled at the end of an epoch, else ``{step:06d}``;
* ``<i>`` is the prompt's position in the prompts file;
* ``<timestamp>`` is local time ``%Y%m%d%H%M%S`` when the image is saved;
* ``_<seed>`` is there only when the prompt gave a seed (``--d``);
* without an ``output_name`` the name starts at ``<num>``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_DIR_NAME = "sample"
TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"

_NAME_RE = re.compile(
    r"(?:(?P<output_name>.*)_)?(?:e(?P<epoch>\d{6,})|(?P<step>\d{6,}))_(?P<index>\d{2,})"
    r"_(?P<timestamp>\d{14})(?:_(?P<seed>\d+))?\.png"
)


def sample_dir(output_dir: str | Path) -> Path:
    """``<output_dir>/sample``, where kohya writes the images."""
    return Path(output_dir) / SAMPLE_DIR_NAME


def sample_filename(
    output_name: str | None,
    index: int,
    *,
    step: int,
    epoch: int | None = None,
    seed: int | None = None,
    when: float | time.struct_time | None = None,
) -> str:
    """kohya's file name for prompt ``index`` sampled at ``step`` (or at the end of ``epoch``).

    ``when``: seconds since the epoch or a local ``struct_time``; now when None.
    """
    if when is None:
        stamp = time.localtime()
    elif isinstance(when, time.struct_time):
        stamp = when
    else:
        stamp = time.localtime(when)
    num = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = "" if output_name is None else output_name + "_"
    suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{num}_{index:02d}_{time.strftime(TIMESTAMP_FORMAT, stamp)}{suffix}.png"


@dataclass(frozen=True)
class SampleName:
    output_name: str | None
    step: int | None  # None when sampled at an epoch's end
    epoch: int | None
    index: int
    timestamp: str
    seed: int | None


def parse_sample_filename(name: str) -> SampleName | None:
    """The parts of a kohya sample file name, or None if ``name`` is not one."""
    m = _NAME_RE.fullmatch(name)
    if not m:
        return None
    return SampleName(
        output_name=m.group("output_name"),
        step=int(m.group("step")) if m.group("step") is not None else None,
        epoch=int(m.group("epoch")) if m.group("epoch") is not None else None,
        index=int(m.group("index")),
        timestamp=m.group("timestamp"),
        seed=int(m.group("seed")) if m.group("seed") is not None else None,
    )
