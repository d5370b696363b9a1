"""Helpers shared by the Triton launchers: interpreter detection, output allocation, input checks.

Legend: N routed rows, T tokens, D model dim, E experts.

Checks raise ValueError naming the argument, the constraint and the fix. Checks on tensor *values*
(counts summing to N, indices in range) must not synchronise with a CUDA device, so there they become
asynchronous device asserts (`torch._assert_async`, capturable in a CUDA graph): a violation surfaces
as a device-side assert at the next synchronisation (torch does not print the message there) instead
of a ValueError. On the CPU (the Triton interpreter) they are ValueErrors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    """Whether Triton kernels defined now run in the interpreter (read once, at kernel definition)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 x rounded to `dtype`. On a GPU a plain cast (round to nearest even); the interpreter's
    fp32 -> bf16 cast truncates instead, so there (INTERPRETER) bf16 rounds on the bits."""
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


def empty_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised output buffer. Every launcher allocates through this one function so the tests
    can swap in a NaN-filled buffer and catch elements a kernel forgot to write."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's TF32 switch so tests with TF32 off are exact fp32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_matrix(name: str, t: torch.Tensor, *, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
                 ndim: int = 2) -> None:
    """A contiguous floating tensor of rank `ndim`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if not t.is_contiguous():
        raise ValueError(f"{name} with shape {tuple(t.shape)} and strides {t.stride()} is not contiguous; "
                         f"pass {name}.contiguous()")


def check_vector(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], length: int | None = None) -> None:
    """A contiguous 1-D tensor of one of `dtypes`, optionally of a given length."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in dtypes:
        desc = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {' or '.join(map(str, dtypes))}, got {desc}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} entries but {length} are needed")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (stride {t.stride()}); pass {name}.contiguous()")


def check_index(name: str, t: torch.Tensor, length: int | None = None) -> None:
    """A contiguous 1-D int32/int64 tensor, optionally of a given length."""
    check_vector(name, t, INDEX_DTYPES, length)


def check_device(interpreted: bool, **tensors: torch.Tensor) -> None:
    """All tensors on one device that the kernels (compiled or `interpreted`) can run on."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}; move them with .to(device)")
    dev = next(iter(devices.values()))
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"Triton kernels run on CUDA (or on the CPU with TRITON_INTERPRET=1), got device {dev}")
    if dev.type == "cpu" and not interpreted:
        raise ValueError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before the kernels "
                         "are imported, or use the reference backend (MOE_KERNELS=reference)")


def check_value(ok: torch.Tensor, message: str) -> None:
    """Value check without a host sync on CUDA (async device assert); a ValueError on the CPU."""
    if ok.device.type == "cuda":
        torch._assert_async(ok, message)  # no host sync: fails at the next synchronisation
    elif not bool(ok):
        raise ValueError(message)


def check_counts(counts_E: torch.Tensor, num_experts: int, num_rows: int) -> None:
    """counts_E: [E] non-negative integers summing to the number of rows."""
    check_index("counts_E", counts_E, num_experts)
    # one combined check keeps it to a single async assert on CUDA
    check_value((counts_E.sum() == num_rows) & (counts_E.min() >= 0),
                f"counts_E must be non-negative and sum to the number of rows N={num_rows} (rows sorted by "
                "expert, no padding); compute them with moe_runtime.kernels.sort_by_expert")


def check_indices_in_range(name: str, idx_N: torch.Tensor, upper: int) -> None:
    """Every entry of idx_N in [0, upper)."""
    if idx_N.numel() == 0:
        return
    check_value((idx_N.min() >= 0) & (idx_N.max() < upper),
                f"{name} has entries outside [0, {upper}); they must index rows of the {upper}-row input")
