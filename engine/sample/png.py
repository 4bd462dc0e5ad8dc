"""A sample's PNG: its generation parameters in text chunks, written atomically.

Chunks: ``parameters`` in the A1111 layout most image viewers and UIs read
(``<prompt>\\nNegative prompt: <neg>\\nSteps: 30, Sampler: ddim, CFG scale: 7.5, Seed: 42,
Size: 512x512``) and ``spyke_sample``, the same values as JSON. Nothing that changes
between two draws of the same prompt (time, file name) goes in, so the same prompt and
seed give the same bytes.

The bytes go to ``.{name}.tmp-<pid>-<hex>`` in the same folder (the temp-name pattern
``engine.checkpoint.cleanup_temp_files`` removes after a kill), are fsynced, and only then
``os.replace``d into place; on failure the temp file is removed and the OSError raised.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from engine.io.atomic import write_file

PARAMETERS_KEY = "parameters"
JSON_KEY = "spyke_sample"


def sample_parameters(*, prompt: str, negative_prompt: str | None, seed: int, steps: int, scale: float,
                      sampler: str, width: int, height: int) -> dict:
    return {"prompt": prompt, "negative_prompt": negative_prompt or "", "seed": seed, "steps": steps,
            "scale": scale, "sampler": sampler, "width": width, "height": height}


def a1111_parameters(params: dict) -> str:
    lines = [params["prompt"]]
    if params["negative_prompt"]:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(f"Steps: {params['steps']}, Sampler: {params['sampler']}, CFG scale: {params['scale']:g}, "
                 f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}")
    return "\n".join(lines)


def encode_png(image, params: dict) -> bytes:
    """``image`` (a PIL image) as PNG bytes carrying ``params`` in its text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(params))
    info.add_text(JSON_KEY, json.dumps(params, ensure_ascii=False, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_parameters(path: str | Path) -> dict | None:
    """The ``spyke_sample`` values of a sample PNG, or None if it has none."""
    from PIL import Image

    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(JSON_KEY)
    return json.loads(text) if text else None


def write_atomic(path: str | Path, data: bytes) -> None:
    """The PNG through the project's one atomic writer (temp name, fsync, rename, fsync the folder)."""
    write_file(Path(path), data)
