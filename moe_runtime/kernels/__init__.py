"""Expert-computation kernels. Each op has a Triton path (CUDA) and a plain-PyTorch reference.

Backend choice, per call: the environment variable MOE_KERNELS = "auto" (default: Triton on CUDA
when importable, else the reference), "triton" (fail loudly if unavailable) or "reference".
`set_backend()` overrides the variable from Python. In "auto" mode a Triton op that fails to
compile or launch (a Triton/driver mismatch, too little shared memory on a smaller GPU) is
reported once with a warning and that op falls back to the reference for the rest of the process;
input errors (ValueError, TypeError) are raised as they are.

Triton kernels: kernels.grouped_gemm (grouped GEMM and the fused SwiGLU expert MLP), kernels.quant_gemm
(the expert MLP on quantised weights, formats in kernels.quant) and
kernels.permutation (permute / unpermute; a submodule named `permute` would shadow the function below).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from moe_runtime.kernels.reference import (grouped_mlp_reference, permute_reference, sort_by_expert_reference,
                               unpermute_reference)

_BACKENDS = ("auto", "triton", "reference")
_override: str | None = None
_fallen_back: dict[str, str] = {}
"""op name -> why auto mode stopped using its Triton kernel."""


def set_backend(name: str | None) -> None:
    """Force 'triton' or 'reference' (or 'auto'); None returns control to MOE_KERNELS."""
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {_BACKENDS}")
    global _override
    _override = name


def backend_for(device: torch.device) -> str:
    """The backend a call on `device` will use: 'triton' or 'reference'."""
    name = _mode()
    if name not in _BACKENDS:
        raise ValueError(f"MOE_KERNELS={name!r} is not one of {_BACKENDS}; unset it or pick one of those")
    if name == "reference":
        return "reference"
    available = triton_available()
    if name == "triton":
        if not available:
            raise RuntimeError("MOE_KERNELS=triton but Triton kernels are unavailable; "
                               "install them with `pip install 'moe-runtime[triton]'`")
        if device.type != "cuda" and not _kernels_interpreted():
            raise RuntimeError(f"MOE_KERNELS=triton needs a CUDA tensor (got {device}); set TRITON_INTERPRET=1 "
                               "before the kernels are first imported to run Triton on the CPU for testing")
        return "triton"
    return "triton" if available and device.type == "cuda" else "reference"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        # imported together so both kernel modules see the same TRITON_INTERPRET
        from moe_runtime.kernels import grouped_gemm, permutation  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels_interpreted() -> bool:
    """Whether the Triton kernels run in the interpreter: fixed when kernels.grouped_gemm is first
    imported (triton.jit reads TRITON_INTERPRET then), so setting the variable later has no effect."""
    from moe_runtime.kernels._grouped_gemm_kernels import INTERPRETED
    return INTERPRETED


def _mode() -> str:
    return _override or os.environ.get("MOE_KERNELS", "auto")


def _dispatch(op: str, device: torch.device, triton_call: Callable[[], torch.Tensor],
              reference_call: Callable[[], torch.Tensor]) -> torch.Tensor:
    if backend_for(device) != "triton" or op in _fallen_back:
        return reference_call()
    try:
        return triton_call()
    except (ValueError, TypeError):
        raise
    except Exception as e:  # compile / launch failure of the Triton path
        if _mode() != "auto":
            raise
        _fallen_back[op] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"kernels.{op}: the Triton kernel failed ({_fallen_back[op]}); using the PyTorch reference "
                      f"for the rest of this process. Set MOE_KERNELS=triton to make this an error.", RuntimeWarning)
        return reference_call()


def grouped_mlp(x_sorted_ND: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor,
                counts_E: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP over rows sorted by expert (see kernels.reference.grouped_mlp_reference)."""
    def triton_call():
        from moe_runtime.kernels.grouped_gemm import grouped_mlp_triton
        return grouped_mlp_triton(x_sorted_ND, w13_EDF2, w2_EFD, counts_E)
    return _dispatch("grouped_mlp", x_sorted_ND.device, triton_call,
                     lambda: grouped_mlp_reference(x_sorted_ND, w13_EDF2, w2_EFD, counts_E))


def grouped_mlp_quant(x_sorted_ND: torch.Tensor, experts, counts_E: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP over rows sorted by expert with quantised weights (a kernels.quant.QuantExperts
    bank): the Triton kernel decodes inside its weight loads; the reference dequantises one expert at a time."""
    from moe_runtime.kernels.quant import grouped_mlp_quant_reference

    def triton_call():
        from moe_runtime.kernels.quant_gemm import grouped_mlp_quant_triton
        return grouped_mlp_quant_triton(x_sorted_ND, experts, counts_E)
    return _dispatch("grouped_mlp_quant", x_sorted_ND.device, triton_call,
                     lambda: grouped_mlp_quant_reference(x_sorted_ND, experts, counts_E))


def permute(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    """Gather rows into expert order."""
    def triton_call():
        from moe_runtime.kernels.permutation import permute_triton
        return permute_triton(x_TD, token_idx_N)
    return _dispatch("permute", x_TD.device, triton_call, lambda: permute_reference(x_TD, token_idx_N))


def unpermute(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Weighted scatter-add back to token order."""
    def triton_call():
        from moe_runtime.kernels.permutation import unpermute_triton
        return unpermute_triton(y_ND, token_idx_N, weight_N, num_tokens)
    return _dispatch("unpermute", y_ND.device, triton_call,
                     lambda: unpermute_reference(y_ND, token_idx_N, weight_N, num_tokens))


def sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the flattened (token, slot) assignments by expert, and counts per expert."""
    return sort_by_expert_reference(topk_idx_TK, num_experts)


__all__ = ["grouped_mlp", "grouped_mlp_quant", "permute", "unpermute", "sort_by_expert", "set_backend", "backend_for",
           "triton_available"]
