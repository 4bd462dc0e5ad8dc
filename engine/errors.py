"""User-facing errors: one line, naming the file or field and what to do."""

from __future__ import annotations


class SpykeError(Exception):
    """An error the user can fix. ``str(err)`` is a single line meant for people.

    The CLI prints it without a traceback; the cockpit shows it in its log panel.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(SpykeError):
    """A bad flag, TOML key, value or path in the run's configuration."""


class DatasetError(SpykeError):
    """A problem with the images, captions or the dataset TOML."""


class ModelLoadError(SpykeError):
    """The base model could not be found or loaded."""


class CheckpointError(SpykeError):
    """A checkpoint or state could not be written or verified."""


class DiskFullError(CheckpointError):
    """A checkpoint or state did not fit in the output folder's free space (refused before writing, or ENOSPC)."""
