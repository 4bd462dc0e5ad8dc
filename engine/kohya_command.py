"""A kohya training command as users keep it <-> a spyke-cockpit preset.

:func:`command_to_argv` reads a whole shell command (line continuations, quotes, ``VAR=…``
prefixes, ``accelerate launch`` and its own flags, ``python``, the path to ``train_network.py``)
and returns the flags ``train_network.py`` gets. :func:`export_command` prints a config as the
``accelerate launch … train_network.py …`` command that trains the same run.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Mapping

from engine.errors import ConfigError

SCRIPT = "train_network.py"
SECRETS = ("wandb_api_key",)  # never printed (kohya's --output_config leaves it out of a config file too)


_CONTINUATION = {"^": "a Windows cmd line continuation", "`": "a PowerShell line continuation"}
# a backslash before a letter, digit, '_' or '.' escapes nothing in a POSIX shell: it is a Windows path separator
_WINDOWS_SEPARATOR = re.compile(r"\\[\w.]")


def _flag_of(words: list[str], at: int) -> str | None:
    """The flag a word belongs to: the word itself (``--flag=value``) or the nearest ``--flag`` before it."""
    for word in reversed(words[:at + 1]):
        if word.startswith("--"):
            return word.split("=", 1)[0]
    return None


def _refuse_windows_text(text: str) -> None:
    """import-kohya reads POSIX shell text: a Windows continuation or path is refused in one line naming its
    flag (shlex would drop the backslashes of C:\\models\\x silently, or read one line of a ^-continued command)."""
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        end = line.rstrip()[-1:]
        if end in _CONTINUATION and not line.lstrip().startswith("#"):
            # the script's flag on that line, else the next one (the launcher's own flags are not the script's)
            words = " ".join(lines[:number - 1]).split()
            before = len(words)
            words += " ".join(lines[number - 1:]).split()
            script = next((i for i, w in enumerate(words) if w.strip("\"'").endswith(SCRIPT)), -1)
            flags = [(i, w.split("=", 1)[0]) for i, w in enumerate(words) if w.startswith("--") and i > script]
            on_line = [f for i, f in flags if before <= i < before + len(line.split())]
            flag = (on_line or [f for _, f in flags] or [f"line {number}"])[0]
            raise ConfigError(f"{flag}: line {number} ends in {end!r}, {_CONTINUATION[end]}; import-kohya reads "
                              "POSIX shell text: end the lines with \\ (or put the command on one line) and "
                              "write paths with /")
    try:
        words = shlex.split(re.sub(r"\\\r?\n", " ", text), comments=True, posix=False)
    except ValueError:
        return  # an unclosed quote: reported by the POSIX read
    script = next((i for i, w in enumerate(words) if w.strip("\"'").endswith(SCRIPT)), -1)
    for at, word in enumerate(words[script + 1:], script + 1):  # the script's flags (the launcher's are not read)
        if _WINDOWS_SEPARATOR.search(word):
            value = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
            value = value.strip("\"'")
            flag = _flag_of(words, at)
            if flag is None:
                continue
            raise ConfigError(f"{flag}: {value} is a Windows path; import-kohya reads POSIX shell text, where a "
                              f"backslash escapes the next character: write it with / "
                              f"({value.replace(chr(92), '/')}) or give a path on this machine")


def command_to_argv(text: str) -> list[str]:
    """The arguments after ``train_network.py`` in a shell command (one ConfigError line when there is none)."""
    _refuse_windows_text(text)
    joined = re.sub(r"\\\r?\n", " ", text)
    # Keep the line that runs the script (a file may hold cd/export lines before it).
    lines = [ln for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    runs = [ln for ln in lines if SCRIPT in ln]
    if not runs:
        if lines and lines[0].lstrip().startswith("--"):
            runs = [" ".join(lines)]  # only the flags
        else:
            raise ConfigError(f"no {SCRIPT} command found: paste the whole `accelerate launch … {SCRIPT} …` "
                              "command, or just its flags")
    try:
        words = shlex.split(runs[-1], comments=True)
    except ValueError as err:
        raise ConfigError(f"cannot read the command: {err} (an unclosed quote?)") from None
    for i, word in enumerate(words):
        if word == SCRIPT or word.endswith("/" + SCRIPT) or word.endswith("\\" + SCRIPT):
            return words[i + 1:]
    if words and words[0].startswith("--"):
        return words
    raise ConfigError(f"no {SCRIPT} command found in {runs[-1][:60]!r}")


def export_command(values: Mapping[str, Any], ours: set[str] = frozenset()) -> str:
    """``accelerate launch --num_cpu_threads_per_process=1 train_network.py --flag=value …``: every flag whose value
    is not what kohya does without it (never ``--max_token_length=75``), so the command is minimal and parses
    back to the same settings. spyke-cockpit's own flags (``ours``) are no kohya flags: they are named in a
    comment line instead."""
    from engine.kohya_config import at_kohya_default

    parts = ["accelerate launch --num_cpu_threads_per_process=1", SCRIPT]
    left_out = []
    secret = ""
    for name, value in values.items():
        if value is None or at_kohya_default(name, value):
            continue
        if name in SECRETS:
            secret = (f"# --{name} left out: a secret does not belong in a command line (wandb shows it); give it "
                      "in the --config_file, or as WANDB_API_KEY in the environment\n")
        elif name in ours:
            left_out.append(f"--{name}={value}" if value is not True else f"--{name}")
        elif value is True:
            parts.append(f"--{name}")
        elif isinstance(value, list):
            parts.append(f"--{name} " + " ".join(shlex.quote(str(v)) for v in value))
        else:
            parts.append(f"--{name}={shlex.quote(_number(value))}")
    tail = f"# spyke-cockpit's own settings, no kohya flags, left out: {' '.join(left_out)}\n" if left_out else ""
    return " \\\n  ".join(parts) + "\n" + tail + secret


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
