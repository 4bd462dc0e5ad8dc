"""kohya's fine-tuning subsets (``metadata_file``): captions and tags per image from a JSON or
JSONL metadata file, as ``FineTuningDataset`` reads them.

* JSON: ``{"<image key>": {"caption": "...", "tags": "..."}, ...}`` (what kohya's
  ``merge_captions_to_metadata.py`` / ``merge_dd_tags_to_metadata.py`` write).
* JSONL (``.jsonl``): one ``{"image_path": ..., "caption": ..., "tags": ...}`` per line.
* An image key is a path; a relative one is taken inside the subset's ``image_dir``.
  kohya's metadata keys are often written without the extension: then the first of
  .png/.jpg/.jpeg/.webp/.bmp that exists is used.
* caption = the caption (or ""), then ``caption_separator`` + tags when there are tags
  (with ``enable_wildcard``: the tags are added to each non-empty caption line).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.dataset_config import SubsetSpec
from engine.errors import DatasetError

__all__ = ["read_finetune_metadata"]


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read metadata_file {path}: {err}") from None
    try:
        if path.suffix.lower() == ".jsonl":
            out = {}
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                md = json.loads(line)
                if not isinstance(md, dict) or "image_path" not in md:
                    raise DatasetError(f"metadata_file {path} line {n}: each line must be an object with image_path")
                out[md["image_path"]] = {k: md[k] for k in ("caption", "tags") if k in md}
            return out
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"metadata_file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DatasetError(f"metadata_file {path} must be an object of image key -> {{\"caption\", \"tags\"}}")
    return data


def _image_path(key: str, subset: SubsetSpec, extensions: tuple[str, ...]) -> Path:
    p = Path(key).expanduser()
    if not p.is_absolute():
        p = subset.image_dir / p
    if p.is_file():
        return p
    for ext in extensions:
        for cand in (p.with_name(p.name + ext), p.with_name(p.name + ext.upper())):
            if cand.is_file():
                return cand
    raise DatasetError(f"{subset.where}: metadata_file {subset.metadata_file.name} lists {key!r} but no such image "
                       f"is in {p.parent}; fix image_dir or the metadata")


def _text(value, path: Path, key: str, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DatasetError(f"metadata_file {path}: {key!r} has {field} = {value!r}; it must be a string")


def read_finetune_metadata(subset: SubsetSpec, extensions: tuple[str, ...]) -> list[tuple[Path, str, bool]]:
    """[(image path, caption, True)] for a fine-tuning subset, in sorted image-key order."""
    path = subset.metadata_file
    data = _load(path)
    if not data:
        raise DatasetError(f"{subset.where}: metadata_file {path} lists no images; add entries or remove the subset")
    sep = subset.caption_separator
    out = []
    for key in sorted(data):
        md = data[key]
        caption = _text(md.get("caption"), path, key, "caption") or ""
        tags = _text(md.get("tags"), path, key, "tags")
        if subset.enable_wildcard:
            if tags is not None:
                tags = tags.replace("\n", sep)
                caption = "\n".join(f"{line}{sep}{tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = (caption + sep if caption else "") + tags
        out.append((_image_path(key, subset, extensions), caption, True))
    return out
