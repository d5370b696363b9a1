"""The host expert kernel (offload/cpu_experts.py): the bf16 SwiGLU expert through the C kernel equals
the float64 expert within the bound of its own roundings (one bf16 rounding of the hidden activations
and one of the output, fp32 sums; torch's bf16 path rounds more often), on shapes that are not block
multiples, at 1-8 rows and 1-2 threads, in both builds (AVX512-BF16 and portable C); the engine's host
path takes it exactly where it applies; calibration records which path it timed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_runtime.offload import cpu_experts as ce
from tests.helpers import TOL, assert_close

KERNEL, HOW = ce.host_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"host kernel not built here: {HOW}")


def expert(D: int, Fh: int, N: int, seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w13 = (torch.randn(D, 2 * Fh, generator=g) * D ** -0.5).to(dtype)
    w2 = (torch.randn(Fh, D, generator=g) * Fh ** -0.5).to(dtype)
    return x, w13, w2


def exact(x, w13, w2):
    """float64 expert, and its hidden activations a = silu(gate) * up."""
    Fh = w2.shape[0]
    h = x.double() @ w13.double()
    a = F.silu(h[:, :Fh]) * h[:, Fh:]
    return a @ w2.double(), a


def check_against_float64(y, x, w13, w2, what: str) -> None:
    """Elementwise a-priori bound for the kernel's arithmetic (u = 2^-8, bf16's unit roundoff): the
    output is rounded to bf16 once (u |y|), the hidden activations once (u |a| @ |W2|), and the fp32
    sums reorder (2 n 2^-24 per reduction of n terms, Higham 3.1), with 1% slack."""
    want, a = exact(x, w13, w2)
    D, Fh = w13.shape[0], w2.shape[0]
    spread_a = a.abs() @ w2.double().abs()
    h = x.double() @ w13.double()
    dh = 2 * D * 2.0 ** -24 * float((x.double().abs() @ w13.double().abs()).max())  # fp32 error of h
    da = 2.1 * float(h.abs().max()) * dh  # |silu'| <= 1.1 and |silu(g)| <= |g|: a moves by <= 2.1 max|h| dh
    fp32 = da * w2.double().abs().sum(0) + 2 * Fh * 2.0 ** -24 * spread_a
    bound = 1.01 * (2.0 ** -8 * (want.abs() + spread_a) + fp32)
    err = (y.double() - want).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"{what}: err {float(err.flatten()[worst]):.3e} > bound "
                                        f"{float(bound.flatten()[worst]):.3e} at element {worst}")
    assert_close(y.float(), want.float(), torch.bfloat16, what=what)


@needs_kernel
@pytest.mark.parametrize("D,Fh", [(32, 24), (33, 17), (64, 48), (130, 100), (256, 40)])
@pytest.mark.parametrize("N", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_expert_matches_float64(D, Fh, N, threads):
    x, w13, w2 = expert(D, Fh, N, seed=D + N)
    y = ce.kernel_expert_forward(x, w13, w2, threads=threads)
    assert y.dtype == torch.bfloat16 and y.shape == (N, D)
    check_against_float64(y, x, w13, w2, f"D={D} F={Fh} N={N} threads={threads}")


@needs_kernel
@pytest.mark.parametrize("N,D,O", [(1, 7, 5), (3, 34, 47), (8, 64, 64), (9, 17, 100), (2, 256, 33)])
def test_host_matmul_is_an_fp32_sum_of_exact_products(N, D, O):
    g = torch.Generator().manual_seed(N * D)
    x, w = torch.randn(N, D, generator=g).bfloat16(), torch.randn(D, O, generator=g).bfloat16()
    want = x.double() @ w.double()
    bound = 2 * D * 2.0 ** -24 * float((x.double().abs() @ w.double().abs()).max())  # fp32 reorder bound
    for threads in (1, 2):
        err = float((ce.host_matmul(x, w, threads=threads).double() - want).abs().max())
        assert err <= bound, f"N={N} D={D} O={O} threads={threads}: err {err:.3e} > fp32 bound {bound:.3e}"


def test_portable_build_matches_float64():
    """The build for CPUs without AVX512-BF16 (compiler-vectorised fp32 FMA)."""
    kernel, how = ce.build_host_kernel(("-mno-avx512bf16",) if KERNEL is not None else ())
    if kernel is None:
        pytest.skip(f"no portable build here: {how}")
    assert kernel.isa == "portable C", how
    for D, Fh, N in [(33, 17, 3), (130, 100, 8), (64, 48, 1)]:
        x, w13, w2 = expert(D, Fh, N, seed=7)
        check_against_float64(ce.kernel_expert_forward(x, w13, w2, kernel=kernel, threads=2), x, w13, w2,
                              f"portable D={D} F={Fh} N={N}")


@needs_kernel
def test_host_path_takes_the_kernel_exactly_where_it_applies(monkeypatch):
    calls = []
    real = ce.kernel_expert_forward
    monkeypatch.setattr(ce, "kernel_expert_forward", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    with torch.no_grad():
        for N in (1, ce.HOST_KERNEL_MAX_ROWS, ce.HOST_KERNEL_MAX_ROWS + 1):
            x, w13, w2 = expert(64, 48, N)
            y = ce.host_expert_forward(x, w13, w2, torch.tensor([N]))
            check_against_float64(y, x, w13, w2, f"host path N={N}")
        x, w13, w2 = expert(64, 48, 2, dtype=torch.float32)  # fp32 experts: torch's path, bit for bit
        assert torch.equal(ce.host_expert_forward(x, w13, w2, torch.tensor([2])),
                           ce.expert_forward(x, w13, w2, torch.tensor([2])))
    assert calls == [1, ce.HOST_KERNEL_MAX_ROWS], calls
    x, w13, w2 = expert(64, 48, 2)
    x.requires_grad_(True)  # the kernel has no backward: with autograd on, torch's path runs
    assert ce.host_expert_forward(x, w13, w2, torch.tensor([2])).grad_fn is not None
    assert calls == [1, ce.HOST_KERNEL_MAX_ROWS]


def test_env_switch_keeps_torch_path(monkeypatch):
    monkeypatch.setenv("MOE_HOST_KERNEL", "torch")
    ce.host_kernel.cache_clear()
    try:
        assert ce.host_kernel() == (None, "torch (MOE_HOST_KERNEL=torch)")
        assert ce.host_path(torch.bfloat16) == "torch (torch (MOE_HOST_KERNEL=torch))"
        x, w13, w2 = expert(32, 24, 2)
        with torch.no_grad():
            assert torch.equal(ce.host_expert_forward(x, w13, w2, torch.tensor([2])),
                               ce.expert_forward(x, w13, w2, torch.tensor([2])))
        with pytest.raises(RuntimeError, match="host kernel is not available"):
            ce.host_matmul(x, w13)
    finally:
        monkeypatch.delenv("MOE_HOST_KERNEL")
        ce.host_kernel.cache_clear()


@needs_kernel
def test_host_matmul_rejects_what_it_cannot_read():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"bf16 host weight \[D, O\]"):
        ce.host_matmul(x, torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"bf16 host weight \[D, O\]"):
        ce.host_matmul(x, torch.randn(9, 4).bfloat16())


def test_calibration_records_the_host_path_it_timed():
    cal = ce.Calibration(device="cpu", expert_bytes=8_000_000, copy_s=1e-3, tokens=(1, 8), host_s=(2e-3, 4e-3),
                         device_s=(1e-4, 2e-4), act_s_per_token=0.0, host_path=ce.host_path(torch.bfloat16))
    d = cal.to_dict()
    assert d["host_gbps"] == pytest.approx(4.0) and d["host_path"] == cal.host_path
    assert ce.Calibration.from_dict(d) == cal
    old = {k: v for k, v in d.items() if k not in ("host_path", "host_gbps", "copy_gbps")}
    assert ce.Calibration.from_dict(old).host_path == "torch"  # calibrations recorded before the kernel


@needs_kernel
def test_engine_runs_bf16_host_misses_through_the_kernel(monkeypatch):
    """A bf16 model whose cost model sends every miss to the host: the engine's host runs go through
    the kernel, and tokens and logits stay those of the resident model (bf16 tolerance)."""
    from moe_runtime.offload.engine import ExpertCacheEngine
    from tests.test_offload_support import resident_generate, tiny_cfg, twin_models
    calls = []
    real = ce.kernel_expert_forward
    monkeypatch.setattr(ce, "kernel_expert_forward", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    resident, offloaded = twin_models(tiny_cfg("pre_attention"), dtype=torch.bfloat16)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    want_tokens, want_logits = resident_generate(resident, prompt, 8)
    cal = ce.Calibration(device="cpu", expert_bytes=1, copy_s=1.0, tokens=(1, 64), host_s=(1e-6, 64e-6),
                         device_s=(1e-3, 64e-3), act_s_per_token=0.0)  # host runs always win
    engine = ExpertCacheEngine(offloaded, device="cpu", gpu_expert_slots=3, policy="lru", cpu_experts=True,
                               calibration=cal)
    res = engine.generate(prompt, 8, return_logits=True)
    assert res.report["decode"]["cpu_served"] > 0 and calls and max(calls) <= ce.HOST_KERNEL_MAX_ROWS
    # bf16: the kernel rounds once where torch rounds three times, so a greedy near-tie may go the other
    # way. Each row's tokens equal the resident's up to its first difference, the logits up to there are
    # within bf16 tolerance, and a difference is only allowed where the resident's top two were a tie
    # within that tolerance (after it the two sequences no longer see the same context).
    rtol, atol = TOL[torch.bfloat16]
    got, want = res.logits.float(), want_logits.float()
    for b in range(prompt.shape[0]):
        diff = (res.tokens[b] != want_tokens[b]).nonzero()
        t = int(diff[0]) if len(diff) else want_tokens.shape[1]
        assert_close(got[:t, b], want[:t, b], torch.bfloat16, what=f"bf16 engine with host kernel, row {b}")
        if t < want_tokens.shape[1]:
            w = want[t, b]
            gap = float(w[want_tokens[b, t]] - w[res.tokens[b, t]])
            assert gap <= atol + rtol * float(w.abs().max()), \
                f"row {b} step {t}: tokens differ where the resident's margin {gap:.3e} is no bf16 tie"


def test_a_damaged_cached_kernel_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """The cached library carries a sha256 over all of it; a truncated or altered file is rebuilt."""
    monkeypatch.setenv("MOE_RUNTIME_CACHE", str(tmp_path))
    kernel, how = ce.build_host_kernel(("-DMOE_TEST_DIGEST=1",))
    if kernel is None:
        pytest.skip(f"no host kernel here: {how}")
    so = Path(kernel.path)
    digest = so.with_name(so.name + ".sha256")
    assert so.parent == tmp_path / "host_kernel" and digest.read_text().strip() == ce._sha256_file(so)
    good = so.read_bytes()
    torn = so.with_name("torn")  # a torn write / damaged disk (a new file: the loaded one stays mapped)
    torn.write_bytes(good[: len(good) // 2])
    torn.replace(so)
    kernel2, how2 = ce.build_host_kernel(("-DMOE_TEST_DIGEST=1",))
    assert kernel2 is not None, how2
    assert ce._sha256_file(so) == digest.read_text().strip() and len(so.read_bytes()) == len(good)
    digest.unlink()  # a library without its digest is not trusted either
    assert ce.build_host_kernel(("-DMOE_TEST_DIGEST=1",))[0] is not None and digest.exists()
