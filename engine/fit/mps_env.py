"""The MPS allocator's watermark variables, checked before torch reads them.

torch's MPSAllocator reads ``PYTORCH_MPS_HIGH_WATERMARK_RATIO`` (default 1.7) and
``PYTORCH_MPS_LOW_WATERMARK_RATIO`` (default 1.4 on unified memory) when MPS starts, and refuses
a high ratio outside [0, 2] or a low ratio outside [0, high] (0 = no limit; with high 0 the low
bound is 2) with "invalid ... watermark ratio" deep in the first MPS allocation. It parses with
strtod, so a value that is not a number silently becomes 0 (no limit at all); we refuse that too.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Mapping

from engine.errors import ConfigError

HIGH = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
LOW = "PYTORCH_MPS_LOW_WATERMARK_RATIO"
HIGH_DEFAULT = 1.7
LOW_DEFAULT_UNIFIED = 1.4
HIGH_UPPER_BOUND = 2.0


def _ratio(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name)
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a number; torch accepts a ratio in [0, {HIGH_UPPER_BOUND:g}] "
                          f"(0 = no limit) — fix or unset it")
    return value


def check_mps_watermarks(env: Mapping[str, str] | None = None) -> None:
    """Raise one ConfigError line naming the variable and its valid range when torch would reject it."""
    env = os.environ if env is None else env
    high = _ratio(env, HIGH)
    low = _ratio(env, LOW)
    high_value = HIGH_DEFAULT if high is None else high
    if not 0.0 <= high_value <= HIGH_UPPER_BOUND:
        raise ConfigError(f"{HIGH}={env[HIGH]} is outside torch's range [0, {HIGH_UPPER_BOUND:g}] "
                          f"(0 = no limit, default {HIGH_DEFAULT:g}) — set it in that range or unset it")
    limit = HIGH_UPPER_BOUND if high_value == 0.0 else high_value
    low_value = LOW_DEFAULT_UNIFIED if low is None else low
    if not 0.0 <= low_value <= limit:
        if low is None:
            raise ConfigError(f"{HIGH}={env[HIGH]} is below the default {LOW}={LOW_DEFAULT_UNIFIED:g}, which torch "
                              f"then rejects; also set {LOW} in [0, {limit:g}] (e.g. {LOW}={limit / 2:g})")
        raise ConfigError(f"{LOW}={env[LOW]} is outside torch's range [0, {limit:g}] (it must not exceed "
                          f"{HIGH}={high_value:g}) — set it in that range or unset it")


def mps_may_be_used(device: str, platform: str | None = None) -> bool:
    platform = sys.platform if platform is None else platform
    return platform == "darwin" and device in ("auto", "mps")
