"""kohya's ``--sample_sampler`` names mapped to diffusers schedulers, configured as kohya does.

kohya (``library/train_util.py`` ``get_my_scheduler``) builds every scheduler with the SD1
training schedule — ``num_train_timesteps=1000``, ``beta_start=0.00085``, ``beta_end=0.012``,
``beta_schedule="scaled_linear"`` — plus ``algorithm_type`` for ``dpmsolver``/``dpmsolver++``
and ``prediction_type="v_prediction"`` for v-parameterized models; everything else keeps
diffusers' defaults, except ``final_sigmas_type="sigma_min"`` for ``dpmsolver``, which this
diffusers refuses to build otherwise. It then forces ``clip_sample`` to True where a scheduler has that option
(only DDIM does, and its default is already True). The scheduler is set on the pipeline
after it is built, so diffusers' own "fix outdated config" rewrite in
``StableDiffusionPipeline.__init__`` (steps_offset=1, clip_sample=False) does not apply.

``lms``/``k_lms`` use diffusers' LMS scheduler with its coefficient integral done by exact
Gauss-Legendre quadrature (the integrand is a polynomial of degree < 4), so no scipy is needed.
"""

from __future__ import annotations

from engine.errors import ConfigError

# kohya's --sample_sampler choices, in its order.
SAMPLER_NAMES = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a",
    "dpmsolver", "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)
DEFAULT_SAMPLER = "ddim"  # kohya's default

SCHEDULER_TIMESTEPS = 1000
SCHEDULER_LINEAR_START = 0.00085
SCHEDULER_LINEAR_END = 0.0120
SCHEDULER_SCHEDULE = "scaled_linear"

# name -> diffusers scheduler class name (the k_ names are aliases, as in kohya)
_CLASS_NAMES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}
assert set(_CLASS_NAMES) == set(SAMPLER_NAMES)


# PNDM starts with 4 Runge-Kutta steps; diffusers cannot lay out fewer.
_MIN_STEPS = {"pndm": 4}


def check_steps(name: str, steps: int) -> None:
    """ConfigError when sampler ``name`` cannot draw in ``steps`` steps."""
    least = _MIN_STEPS.get(name, 1)
    if steps < least:
        raise ConfigError(f"sampler {name} needs at least {least} steps; write --s {least} or more")


def unknown_sampler_message(name: object, what: str = "--sample_sampler") -> str:
    return f"{what} must be one of {', '.join(SAMPLER_NAMES)} (got {name!r})"


def check_sampler(name: object, what: str = "--sample_sampler") -> str:
    """``name`` if it is one of kohya's sampler names, else a one-line ConfigError listing them."""
    if not isinstance(name, str) or name not in _CLASS_NAMES:
        raise ConfigError(unknown_sampler_message(name, what))
    return name


def scheduler_kwargs(name: str, *, v_parameterization: bool = False) -> dict:
    """The keyword arguments kohya passes to the scheduler class for ``name``."""
    check_sampler(name)
    kwargs: dict = {
        "num_train_timesteps": SCHEDULER_TIMESTEPS,
        "beta_start": SCHEDULER_LINEAR_START,
        "beta_end": SCHEDULER_LINEAR_END,
        "beta_schedule": SCHEDULER_SCHEDULE,
    }
    if name in ("dpmsolver", "dpmsolver++"):
        kwargs["algorithm_type"] = name
    if name == "dpmsolver":
        # diffusers >= 0.26 refuses its default final_sigmas_type="zero" with algorithm_type="dpmsolver";
        # "sigma_min" is what it asks for, and how that solver ended before the option existed.
        kwargs["final_sigmas_type"] = "sigma_min"
    if v_parameterization:
        kwargs["prediction_type"] = "v_prediction"
    return kwargs


def build_scheduler(name: str, *, v_parameterization: bool = False):
    """A fresh diffusers scheduler for kohya's sampler ``name`` (ConfigError if unknown)."""
    import warnings

    import diffusers

    kwargs = scheduler_kwargs(name, v_parameterization=v_parameterization)
    cls = _lms_class() if _CLASS_NAMES[name] == "LMSDiscreteScheduler" else getattr(diffusers, _CLASS_NAMES[name])
    with warnings.catch_warnings():
        # diffusers marks algorithm_type="dpmsolver" deprecated (kohya still offers it), and its
        # k-diffusion schedulers trip NumPy 2 deprecation notices while building their sigmas.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler = cls(**kwargs)
    if getattr(scheduler.config, "clip_sample", None) is False:
        _set_config(scheduler, clip_sample=True)
    return scheduler


def _set_config(scheduler, **values) -> None:
    from diffusers.configuration_utils import FrozenDict

    config = dict(scheduler.config)
    config.update(values)
    scheduler._internal_dict = FrozenDict(config)


_LMS_CLASS = None


def _lms_class():
    """diffusers' LMSDiscreteScheduler with the LMS coefficient integrated without scipy."""
    global _LMS_CLASS
    if _LMS_CLASS is None:
        import numpy as np

        # The module itself, not ``diffusers.LMSDiscreteScheduler``: without scipy that name is a
        # placeholder that refuses to build.
        from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

        nodes, weights = np.polynomial.legendre.leggauss(4)  # exact for polynomials of degree <= 7

        class LMSDiscreteScheduler(LMSDiscreteScheduler):  # noqa: N801 - keeps diffusers' class name
            def get_lms_coefficient(self, order, t, current_order):
                sigmas = [float(s) for s in self.sigmas]
                a, b = sigmas[t], sigmas[t + 1]

                def basis(tau: float) -> float:
                    prod = 1.0
                    for k in range(order):
                        if k != current_order:
                            prod *= (tau - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k])
                    return prod

                half, mid = (b - a) / 2.0, (a + b) / 2.0
                return float(half * sum(w * basis(half * x + mid) for x, w in zip(nodes, weights)))

        _LMS_CLASS = LMSDiscreteScheduler
    return _LMS_CLASS
