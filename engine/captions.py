"""Captions: an image's caption file (kohya's rules), kohya's per-sample caption processing
(prefix/suffix, dropout, wildcards, shuffling, token warm-up, separators), and noticing
captions saved under another extension than the one configured."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

from engine.dataset_config import SubsetSpec
from engine.errors import DatasetError

__all__ = ["CAPTION_EXTENSIONS", "read_caption", "process_caption", "caption_extension_warning",
           "token_warmup_steps", "missing_captions_warning", "empty_captions_warning"]

CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")   # the extensions caption tools commonly write


_ESCAPE_OPEN, _ESCAPE_CLOSE = "\u2985", "\u2986"   # kohya's stand-ins for "{{" and "}}"
_WILDCARD = re.compile(r"\{([^}]+)\}")


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """kohya enable_wildcard: one random line of a multi-line caption, then each ``{a|b|c}`` replaced by one
    random choice, left to right; ``{{``/``}}`` are literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_, close = _ESCAPE_OPEN, _ESCAPE_CLOSE
    while open_ in caption or close in caption:
        open_, close = open_ + _ESCAPE_OPEN, close + _ESCAPE_CLOSE
    caption = caption.replace("{{", open_).replace("}}", close)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_, "{").replace(close, "}")


def token_warmup_steps(subset: SubsetSpec, max_train_steps: int) -> int:
    """kohya token_warmup_step: below 1 a ratio of the run's total steps (floored), else a step count."""
    steps = subset.token_warmup_step
    return math.floor(steps * max_train_steps) if steps < 1 else int(steps)


def process_caption(caption: str, subset: SubsetSpec, rng: random.Random, *, epoch: int | None = None,
                    step: int | None = None, max_train_steps: int = 0) -> str:
    """kohya's ``BaseDataset.process_caption`` for one sample, drawing from ``rng`` in kohya's order.

    ``epoch`` is 1-based (kohya's current_epoch), ``step`` the optimizer steps already done.
    Order: prefix/suffix are added; the caption is dropped whole (``""``) with probability
    ``caption_dropout_rate`` (one draw when the rate is above 0) or on every
    ``caption_dropout_every_n_epochs``-th epoch; otherwise wildcards (or the first line),
    then, when shuffling, token warm-up or tag dropout is on: tags split on
    ``caption_separator`` (``keep_tokens_separator`` splits fixed|flexible|fixed-suffix
    parts, else the first ``keep_tokens`` tags are fixed), warm-up keeps the first
    ``floor(step * (n - token_warmup_min) / warmup) + token_warmup_min`` flexible tags, the
    flexible tags are shuffled, each is dropped with ``caption_tag_dropout_rate``, and all
    are joined with ", "; finally ``secondary_separator`` becomes ``caption_separator``.
    """
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    drop = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if every > 0:
        if epoch is None:
            raise ValueError("process_caption: caption_dropout_every_n_epochs needs the current epoch")
        drop = drop or epoch % every == 0
    if drop:
        return ""
    caption = _expand_wildcards(caption, rng) if subset.enable_wildcard else caption.split("\n")[0]
    warmup = token_warmup_steps(subset, max_train_steps) if subset.token_warmup_step > 0 else 0
    if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
        sep, keep_sep = subset.caption_separator, subset.keep_tokens_separator
        fixed: list[str] = []
        suffix: list[str] = []
        if keep_sep and keep_sep in caption:
            fixed_part, flex_part = caption.split(keep_sep, 1)
            if keep_sep in flex_part:
                flex_part, suffix_part = flex_part.split(keep_sep, 1)
                suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            flex = [t.strip() for t in caption.strip().split(sep)]   # kohya keeps empty tags here
            if subset.keep_tokens > 0:
                fixed, flex = flex[:subset.keep_tokens], flex[subset.keep_tokens:]
        if warmup:
            if step is None:
                raise ValueError("process_caption: token_warmup_step needs the current step")
            if step < warmup:
                n = math.floor(step * ((len(flex) - subset.token_warmup_min) / warmup)) + subset.token_warmup_min
                flex = flex[:n]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def _set_extension(ext: str) -> str:
    return f"set --caption_extension={ext} (or caption_extension = \"{ext}\" in the dataset TOML)"


def _other_extensions(image: Path, configured: str) -> list[str]:
    """The common caption extensions, other than ``configured``, that have a file beside ``image``."""
    return [ext for ext in CAPTION_EXTENSIONS
            if ext != configured and image.with_name(image.stem + ext).is_file()]


def caption_paths(image: Path, extension: str) -> list[Path]:
    """kohya's candidates: ``<stem><ext>``, then, for a face-cropping name ``base_cx_cy_w_h``, ``<base><ext>``."""
    paths = [image.with_name(image.stem + extension)]
    tokens = image.stem.split("_")
    if len(tokens) >= 5:
        paths.append(image.with_name("_".join(tokens[:-4]) + extension))
    return paths


def read_caption(image: Path, subset: SubsetSpec) -> tuple[str, bool]:
    """(caption, from a file?) by kohya's rules.

    The first caption file of ``caption_paths`` that exists: its first line, stripped (with
    ``enable_wildcard``: every non-empty line, joined by newlines); a first line that is empty is an
    empty caption (kohya trains it so; the plan warns); a file without a line is refused (kohya asserts).
    No file: the subset's class tokens; neither: an empty caption (kohya trains it so; the plan warns,
    naming the flag when a caption file with another common extension sits beside the image).
    """
    for cap_path in caption_paths(image, subset.caption_extension):
        if not cap_path.is_file():
            continue
        try:
            text = cap_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DatasetError(f"caption file {cap_path} is not UTF-8; re-save it as UTF-8") from None
        except OSError as err:
            raise DatasetError(f"cannot read caption file {cap_path}: {err}") from None
        lines = text.splitlines()
        if not lines:
            raise DatasetError(f"caption file {cap_path} is empty (not one line; kohya stops on it too); write a "
                               "caption in it, or delete it so the image takes the subset's class tokens")
        if subset.enable_wildcard:
            caption = "\n".join(line.strip() for line in lines if line.strip())
        else:
            caption = lines[0].strip()
        return caption, True
    return (subset.class_tokens or ""), False


def missing_captions_warning(subset: SubsetSpec, uncaptioned: list[Path]) -> str | None:
    """kohya's warning for images that train on an empty caption (no caption file, no class
    tokens); names up to 5 of them. Falling back to the class tokens is the folder-name
    convention and is not warned about."""
    if not uncaptioned or subset.class_tokens:
        return None
    n = len(uncaptioned)
    shown = ", ".join(p.name for p in uncaptioned[:5]) + (f" and {n - 5} more" if n > 5 else "")
    return (f"{subset.image_dir}: {n} image{'s have' if n != 1 else ' has'} no {subset.caption_extension} caption "
            f"file and the subset has no class_tokens ({shown}); {'they train' if n != 1 else 'it trains'} on an "
            f"empty caption, as in kohya; add caption files or set class_tokens")


def empty_captions_warning(subset: SubsetSpec, empty: list[Path]) -> str | None:
    """One line for the images whose caption file gave an empty caption (its first line is blank): kohya reads
    only that line and trains them on an empty caption (not the class tokens); names up to 5."""
    if not empty:
        return None
    n = len(empty)
    shown = ", ".join(p.name for p in empty[:5]) + (f" and {n - 5} more" if n > 5 else "")
    return (f"{subset.image_dir}: {n} caption file{'s have' if n != 1 else ' has'} an empty first line ({shown}); "
            f"kohya reads only the first line, so {'these images train' if n != 1 else 'its image trains'} on an "
            "empty caption, as in kohya; put the caption on the first line")


def caption_extension_warning(subset: SubsetSpec, uncaptioned: list[Path], num_images: int) -> str | None:
    """One line when images of ``subset`` fell back to the class tokens (or an empty caption) although caption files
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
            f"{_fallback(subset)}; {_set_extension(ext)}")


def _fallback(subset: SubsetSpec) -> str:
    return f"the class tokens '{subset.class_tokens}' alone" if subset.class_tokens else "an empty caption"
