"""Read a ``--sample_prompts`` file in kohya sd-scripts' formats.

As kohya's ``library/train_util.py`` (``load_prompts``, ``line_to_prompt_dict``,
``sample_image_inference``) reads them:

* ``.txt``: one prompt per line; empty lines and lines whose first character is ``#`` are
  skipped (an indented ``#`` is a prompt, as in kohya). Options follow the prompt, each
  introduced by `` --``: ``--n`` negative prompt, ``--w`` width, ``--h`` height, ``--d`` seed,
  ``--l`` CFG scale, ``--s`` steps (clamped to 1…1000), ``--ss`` sampler. Option letters
  are case-insensitive. kohya's options for other model families (``--g``, ``--cn``,
  ``--ctr``, ``--rcfg``, ``--fs``) are accepted and, as kohya does for SD1, ignored.
* ``.toml``: a ``[prompt]`` table of defaults and ``[[prompt.subset]]`` tables, one per
  image, with the keys ``prompt``, ``negative_prompt``, ``width``, ``height``, ``seed``,
  ``scale``, ``sample_steps``, ``sample_sampler`` (a subset's key overrides the default;
  kohya refuses that combination with a TypeError).
* ``.json``: a list whose items are such tables or ``.txt``-style lines.

Defaults are kohya's: 512 x 512, 30 steps, scale 7.5, no negative prompt, no seed, the
run's sampler. Width and height are rounded down to a multiple of 8, at least 64.

Where kohya logs or ignores a bad value, or crashes the whole batch, here the bad prompt
is left out and reported as one line naming ``file:line`` (or the entry) and the fix;
its position still counts, so the other prompts keep their file-name index.
Nothing here raises for the file's content: it is re-read while a run goes on.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError
from engine.sample.samplers import SAMPLER_NAMES

PROMPT_SUFFIXES = (".txt", ".toml", ".json")
DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
MIN_SIZE = 64
MAX_STEPS = 1000
_MAX_SEED = 2**64 - 1

# txt option -> table key
_OPTION_KEYS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed",
                "l": "scale", "s": "sample_steps", "ss": "sample_sampler"}
_IGNORED_OPTIONS = ("g", "cn", "ctr", "rcfg", "fs")
# kohya's keys for other model families and its own bookkeeping: accepted, unused for SD1
_IGNORED_KEYS = ("guidance_scale", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg", "flow_shift",
                 "enum", "subset")
_KEYS = ("prompt",) + tuple(_OPTION_KEYS.values())
_EXAMPLE = {"w": 512, "h": 512, "d": 42, "s": 30}
_DIGITS = re.compile(r"[0-9]+")
_OPTION_RE = re.compile(r"(\S+)(?:\s+(.*))?", re.S)


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to draw. ``sampler`` None means the run's ``--sample_sampler``."""

    index: int  # position in the file (kohya's ``enum``): the ``_<i:02d>_`` of the file name
    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    seed: int | None = None
    scale: float = DEFAULT_SCALE
    steps: int = DEFAULT_STEPS
    sampler: str | None = None
    where: str = ""  # ``file:line`` or ``file: entry N``, for messages


@dataclass(frozen=True)
class LoadedPrompts:
    prompts: tuple[SamplePrompt, ...]
    problems: tuple[str, ...]  # one line each; the prompt it names was left out


class PromptProblem(ValueError):
    """What is wrong with one prompt (or the whole file), without the ``file:line`` part."""


def check_prompts_path(path: str | Path) -> Path:
    """The ``--sample_prompts`` flag's value as a Path; ConfigError for a type kohya cannot read."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in PROMPT_SUFFIXES:
        raise ConfigError(f"--sample_prompts={path}: kohya reads .txt, .toml or .json prompt files; "
                          "rename it or point it at one of those")
    return p


def load_prompts(path: str | Path) -> LoadedPrompts:
    """Every good prompt of ``path`` and one line per problem. Never raises for the content."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        return LoadedPrompts((), (f"{path}: kohya reads .txt, .toml or .json prompt files; rename it",))
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return LoadedPrompts((), (f"{path}: prompts file not found; create it or fix --sample_prompts",))
    except UnicodeDecodeError as exc:
        return LoadedPrompts((), (f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8",))
    except OSError as exc:
        return LoadedPrompts((), (f"{path}: cannot read the prompts file ({exc.strerror or exc}); check it",))
    reader = {".txt": _txt_entries, ".toml": _toml_entries, ".json": _json_entries}[suffix]
    try:
        entries = reader(text, str(path))
    except PromptProblem as exc:
        return LoadedPrompts((), (f"{path}: {exc}",))
    prompts: list[SamplePrompt] = []
    problems: list[str] = []
    for index, (where, item) in enumerate(entries):
        try:
            if isinstance(item, PromptProblem):
                raise item
            values = line_to_prompt_dict(item) if isinstance(item, str) else item
            if not isinstance(values, dict):
                raise PromptProblem(f"is a {type(values).__name__}; write a prompt line or a table of prompt keys")
            prompts.append(_to_prompt(index, values, where))
        except PromptProblem as exc:
            problems.append(f"{where}: {exc}; prompt skipped")
    return LoadedPrompts(tuple(prompts), tuple(problems))


def line_to_prompt_dict(line: str) -> dict:
    """A ``.txt`` prompt line as kohya's table keys (``prompt``, ``width``, ...).

    PromptProblem for an option kohya does not know, a missing value or one that is not a number.
    """
    parts = line.split(" --")
    values: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        m = _OPTION_RE.fullmatch(part.strip())
        if not m:
            raise PromptProblem("empty option ' --'; write an option such as --w 512")
        option, value = m.group(1), (m.group(2) or "").strip()
        key = option.lower()
        if key in _IGNORED_OPTIONS:
            continue
        if key not in _OPTION_KEYS:
            raise PromptProblem(f"unknown option --{option}; kohya's are --n --w --h --d --l --s --ss")
        if not value:
            raise PromptProblem(f"--{option} needs a value")
        table_key = _OPTION_KEYS[key]
        if table_key in ("width", "height", "seed", "sample_steps"):
            if not _DIGITS.fullmatch(value):
                raise PromptProblem(f"--{option} {value!r} is not a whole number; write e.g. --{option} {_EXAMPLE[key]}")
            values[table_key] = int(value)
        elif table_key == "scale":
            try:
                values[table_key] = float(value)
            except ValueError:
                raise PromptProblem(f"--{option} {value!r} is not a number; write e.g. --l 7.5") from None
        else:
            values[table_key] = value
    return values


def _txt_entries(text: str, name: str) -> list:
    entries = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or raw.startswith("#"):
            continue
        entries.append((f"{name}:{lineno}", line))
    return entries


def _parsed(text: str, loads, error: type[Exception], message):
    """``loads(text)``, or its ``error`` as one PromptProblem line."""
    try:
        return loads(text)
    except error as exc:
        raise PromptProblem(message(exc)) from None


def _toml_entries(text: str, name: str) -> list:
    data = _parsed(text, tomllib.loads, tomllib.TOMLDecodeError, lambda exc: f"not valid TOML ({exc}); fix the file")
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise PromptProblem("has no [prompt] table; kohya's form is a [prompt] table of defaults "
                   "and one [[prompt.subset]] table per image")
    subsets = table.get("subset")
    if not isinstance(subsets, list) or not subsets:
        raise PromptProblem("has no [[prompt.subset]] tables; add one per image, e.g. [[prompt.subset]] "
                   'prompt = "..."')
    defaults = {k: v for k, v in table.items() if k != "subset"}
    entries = []
    for n, subset in enumerate(subsets, start=1):
        where = f"{name}: [[prompt.subset]] #{n}"
        if not isinstance(subset, dict):
            entries.append((where, PromptProblem("is not a table")))
        else:
            entries.append((where, {**defaults, **subset}))
    return entries


def _json_entries(text: str, name: str) -> list:
    data = _parsed(text, json.loads, json.JSONDecodeError,
                   lambda exc: f"not valid JSON at line {exc.lineno} ({exc.msg}); fix the file")
    if not isinstance(data, list):
        raise PromptProblem("must hold a JSON list of prompts (strings or objects)")
    return [(f"{name}: entry {n}", item) for n, item in enumerate(data, start=1)]


def _to_prompt(index: int, values: dict, where: str) -> SamplePrompt:
    unknown = [k for k in values if k not in _KEYS and k not in _IGNORED_KEYS]
    if unknown:
        raise PromptProblem(f"unknown key {unknown[0]!r}; kohya's are {', '.join(_KEYS)}")
    prompt = values.get("prompt", "")
    if not isinstance(prompt, str):
        raise PromptProblem("prompt must be a string")
    negative = values.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise PromptProblem("negative_prompt must be a string")
    width = _whole(values, "width", DEFAULT_WIDTH)
    height = _whole(values, "height", DEFAULT_HEIGHT)
    steps = _whole(values, "sample_steps", DEFAULT_STEPS)
    seed = values.get("seed")
    if seed is not None:
        seed = _whole(values, "seed", 0)
        if seed > _MAX_SEED:
            raise PromptProblem(f"seed {seed} is too large; use 0 … {_MAX_SEED}")
    scale = values.get("scale", DEFAULT_SCALE)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise PromptProblem(f"scale {scale!r} must be a number ≥ 0; write e.g. 7.5")
    sampler = values.get("sample_sampler")
    if sampler is not None and sampler not in SAMPLER_NAMES:
        raise PromptProblem(f"sampler {sampler!r} is not one of kohya's: {', '.join(SAMPLER_NAMES)}")
    return SamplePrompt(
        index=index, prompt=prompt, negative_prompt=negative,
        width=_round_size(width), height=_round_size(height), seed=seed, scale=float(scale),
        steps=max(1, min(MAX_STEPS, steps)), sampler=sampler, where=where,
    )


def _whole(values: dict, key: str, default: int) -> int:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PromptProblem(f"{key} {value!r} must be a whole number ≥ 0")
    return value


def _round_size(value: int) -> int:
    """kohya: ``max(64, value - value % 8)``."""
    return max(MIN_SIZE, value - value % 8)
