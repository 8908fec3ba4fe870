"""Choose between the Triton kernels and the torch fallback path.

Triton runs when the tensor is on CUDA, or when ``TRITON_INTERPRET=1`` was set before this package was
imported (CPU tensors then go through the Triton interpreter, so CI executes the real kernel code).
Everything else takes the torch path, which gives identical results. ``DATAEFF_KERNELS=torch`` in the
environment, or the :func:`use_torch_kernels` context manager, forces the torch path.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

try:  # Triton is Linux-only; the package must still import elsewhere.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FORCE_TORCH: contextvars.ContextVar[bool] = contextvars.ContextVar("dataeff_force_torch", default=False)


@contextlib.contextmanager
def use_torch_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, run the torch fallback path even where Triton would be used."""
    token = _FORCE_TORCH.set(enabled)
    try:
        yield
    finally:
        _FORCE_TORCH.reset(token)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the kernels for tensor ``t`` run in Triton (True) or in torch (False).

    Always False while ``torch.compile`` traces: the torch path is traced into the graph (inductor fuses it).
    """
    if torch.compiler.is_compiling():
        return False
    if not HAS_TRITON or _FORCE_TORCH.get() or os.environ.get("DATAEFF_KERNELS", "").lower() == "torch":
        return False
    return t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu")


def device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current while launching (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
