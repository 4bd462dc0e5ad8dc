"""Caption files: an image's caption (kohya's rules), shuffling it, and noticing captions
saved under another extension than the one configured."""

from __future__ import annotations

import random
from pathlib import Path

from engine.dataset_config import SubsetSpec
from engine.errors import DatasetError

__all__ = ["CAPTION_EXTENSIONS", "read_caption", "process_caption", "caption_extension_warning"]

CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")   # the extensions caption tools commonly write


def process_caption(caption: str, shuffle: bool, keep_tokens: int, rng: random.Random) -> str:
    """kohya's shuffle_caption / keep_tokens on one caption, using ``rng``."""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(flex)
    return ", ".join(fixed + flex)


def _set_extension(ext: str) -> str:
    return f"set --caption_extension={ext} (or caption_extension = \"{ext}\" in the dataset TOML)"


def _other_extensions(image: Path, configured: str) -> list[str]:
    """The common caption extensions, other than ``configured``, that have a file beside ``image``."""
    return [ext for ext in CAPTION_EXTENSIONS
            if ext != configured and image.with_name(image.stem + ext).is_file()]


def read_caption(image: Path, subset: SubsetSpec) -> tuple[str, bool]:
    """(caption, from a file?): the first line of ``<stem><caption_extension>``, else the class tokens."""
    cap_path = image.with_name(image.stem + subset.caption_extension)
    if cap_path.is_file():
        try:
            text = cap_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DatasetError(f"caption file {cap_path} is not UTF-8; re-save it as UTF-8") from None
        except OSError as err:
            raise DatasetError(f"cannot read caption file {cap_path}: {err}") from None
        lines = text.splitlines()
        caption = lines[0].strip() if lines else ""
        if not caption:
            raise DatasetError(
                f"caption file {cap_path} is empty (first line); write a caption in it or delete it to use class_tokens"
            )
        return caption, True
    if subset.class_tokens:
        return subset.class_tokens, False
    others = _other_extensions(image, subset.caption_extension)
    if others:
        raise DatasetError(
            f"image {image} has no caption file {cap_path.name} but has {image.stem + others[0]}; "
            f"{_set_extension(others[0])}"
        )
    raise DatasetError(
        f"image {image} has no caption file {cap_path.name} and {subset.where} has no class_tokens; "
        f"add a caption file or set class_tokens (or name the folder like 10_yourtoken)"
    )


def caption_extension_warning(subset: SubsetSpec, uncaptioned: list[Path], num_images: int) -> str | None:
    """One line when images of ``subset`` fell back to the class tokens although caption files
    with another common extension sit beside them (the extension most of them have is named)."""
    found: dict[str, int] = {}
    for image in uncaptioned:
        for ext in _other_extensions(image, subset.caption_extension):
            found[ext] = found.get(ext, 0) + 1
    if not found:
        return None
    ext = max(found, key=lambda e: (found[e], -CAPTION_EXTENSIONS.index(e)))
    n = found[ext]
    verb = "has" if n == 1 else "have"
    return (f"{subset.image_dir}: {n} of {num_images} images {verb} no {subset.caption_extension} caption file but a "
            f"{ext} file beside {'it' if n == 1 else 'them'}, so {'it trains' if n == 1 else 'they train'} on "
            f"the class tokens '{subset.class_tokens}' alone; {_set_extension(ext)}")
