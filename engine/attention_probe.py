"""Which attention actually runs in a UNet on its device: the attention processors diffusers put in
its ``Attention`` layers, and the aten kernel PyTorch's ``scaled_dot_product_attention`` dispatches
to for the UNet's head sizes and compute dtype there.

kohya's ``--xformers`` / ``--sdpa`` / ``--mem_eff_attn`` pick an attention implementation; spyke-cockpit
always runs diffusers' ``AttnProcessor2_0``, which calls ``F.scaled_dot_product_attention``. Which fused
kernel that becomes is PyTorch's choice per device, dtype and shape (flash or memory-efficient on CUDA,
the flash kernel for CPU, MPS's own, or the unfused math fallback), so it is measured, not assumed:
:func:`probe_sdpa_kernel` runs one small call of each head size under the run's autocast and records
the aten op the dispatcher picked (a ``TorchDispatchMode`` sees it; no profiler start-up cost). The
unfused math fallback is a composite op the dispatcher only sees decomposed (matmuls and a softmax), so
that is what names it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

SDPA_PROCESSORS = ("AttnProcessor2_0",)     # diffusers processors whose attention is F.scaled_dot_product_attention
MATH = "_scaled_dot_product_attention_math"  # the unfused composite fallback (MPS has its own *_math_for_mps kernel)
_PROBE_QUERY, _PROBE_KEY = 64, 77            # a latent patch against CLIP's 77 tokens: the cross-attention shape


@dataclass(frozen=True)
class AttentionReport:
    processors: tuple[str, ...]     # the processor classes of the UNet's attention layers
    kernels: tuple[str, ...]        # the aten SDPA kernels picked, one per distinct head size (deduplicated)
    head_dims: tuple[int, ...]
    dtype: str                      # the compute dtype of the probe ("float32", "bfloat16", "float16")
    device: str

    @property
    def sdpa(self) -> bool:
        return bool(self.processors) and all(p in SDPA_PROCESSORS for p in self.processors)

    @property
    def fused(self) -> bool:
        """No probed call fell back to the unfused math composite (MPS's own ``…_math_for_mps`` is its kernel)."""
        return bool(self.kernels) and MATH not in self.kernels

    def line(self) -> str:
        """``attention: SDPA (AttnProcessor2_0), kernel _scaled_dot_product_flash_attention_for_cpu
        (cpu, float32, head dims 40/80/160)``."""
        where = f"{self.device}, {self.dtype}, head dim{'s' if len(self.head_dims) != 1 else ''} " \
                f"{'/'.join(map(str, self.head_dims)) or '-'}"
        procs = ", ".join(self.processors) or "no attention layers"
        if not self.sdpa:
            return f"attention: {procs} (not PyTorch SDPA; no SDPA kernel probed) ({where})"
        kernels = ", ".join(self.kernels) or "none seen"
        fallback = "" if self.fused else " — the unfused math fallback"
        return f"attention: SDPA ({procs}), kernel {kernels}{fallback} ({where})"


def unet_processors(unet: Any) -> tuple[str, ...]:
    """The distinct processor class names of ``unet``'s attention layers, sorted."""
    processors = getattr(unet, "attn_processors", None) or {}
    return tuple(sorted({type(p).__name__ for p in processors.values()}))


def unet_head_dims(unet: Any) -> tuple[int, ...]:
    """The distinct attention head sizes of ``unet`` (SD1.5: 40, 80, 160), sorted."""
    dims: set[int] = set()
    for module in unet.modules():
        heads, to_q = getattr(module, "heads", None), getattr(module, "to_q", None)
        if isinstance(heads, int) and heads > 0 and hasattr(to_q, "out_features"):
            dims.add(to_q.out_features // heads)
    return tuple(sorted(dims))


def _recorder():
    """A dispatch mode that records the name of every aten op dispatched under it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    return Recorder()


def probe_sdpa_kernel(device: Any, dtype: Any, head_dim: int, *, autocast_dtype: Any = None, heads: int = 2,
                      requires_grad: bool = True) -> str:
    """The aten kernel ``F.scaled_dot_product_attention`` dispatches to on ``device`` for ``dtype`` tensors of
    ``head_dim`` (under autocast to ``autocast_dtype`` when given, as the training forward runs), e.g.
    ``_scaled_dot_product_flash_attention_for_cpu``; ``"none seen"`` if no SDPA kernel was dispatched."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    shape = (1, heads, _PROBE_QUERY, head_dim)
    # zeros, not random: the kernel does not depend on the values, and the run's seeded RNG stays untouched
    q = torch.zeros(shape, device=device, dtype=dtype, requires_grad=requires_grad)
    k = torch.zeros((1, heads, _PROBE_KEY, head_dim), device=device, dtype=dtype, requires_grad=requires_grad)
    v = torch.zeros_like(k, requires_grad=requires_grad)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    recorder = _recorder()
    with autocast, recorder:
        F.scaled_dot_product_attention(q, k, v)
    found = [op for op in recorder.ops if op.startswith(("_scaled_dot_product", "_flash_attention",
                                                         "_efficient_attention"))]
    if found:
        return found[0]
    # The math fallback is a composite op: the dispatcher sees only what it decomposes into.
    return MATH if any(op in ("bmm", "matmul", "_softmax", "_safe_softmax") for op in recorder.ops) else "none seen"


def attention_report(unet: Any, device: Any, compute_dtype: Any) -> AttentionReport:
    """What attention ``unet`` runs on ``device`` when it computes in ``compute_dtype`` (the mixed-precision
    dtype under autocast, else float32). A probe that fails (an odd backend) is reported, never raised."""
    import torch

    device = torch.device(device)
    processors = unet_processors(unet)
    head_dims = unet_head_dims(unet)
    kernels: list[str] = []
    if processors and all(p in SDPA_PROCESSORS for p in processors):
        autocast = compute_dtype if compute_dtype in (torch.float16, torch.bfloat16) else None
        for head_dim in head_dims:
            try:
                kernel = probe_sdpa_kernel(device, torch.float32, head_dim, autocast_dtype=autocast)
            except Exception as err:  # noqa: BLE001 - a report must never stop a run
                kernel = f"probe failed ({type(err).__name__})"
            if kernel not in kernels:
                kernels.append(kernel)
    return AttentionReport(processors=processors, kernels=tuple(kernels), head_dims=head_dims,
                           dtype=str(compute_dtype).removeprefix("torch."), device=device.type)
