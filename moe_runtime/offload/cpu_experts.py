"""Cold experts on host cores, and the transfer-vs-compute cost model that decides per miss.

Legend: N token rows routed to one expert, D model dim, F expert hidden dim.

For a miss the engine may (Fiddler / MoNDE): copy the expert's weights to a device slot and run it
there, wait for a copy already in flight, or run the expert on the host with its activations moved
instead. Which is cheapest depends on this machine, so every number comes from a calibration at
start-up: the measured time of one expert copy (store -> slot), the measured time of one expert on
the host and on the device for a grid of token counts, and the measured cost of moving activations.
Nothing here is a constant about hardware.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from moe_runtime import kernels
from moe_runtime.core.experts import compute_dtype

DECISIONS = ("wait", "copy", "cpu")


def expert_forward(x_ND: torch.Tensor, w13_DF2: torch.Tensor, w2_FD: torch.Tensor,
                   count_1: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP through the same kernel call ExpertBank makes (a group of one), so
    the result matches the resident model bit for bit where the kernel is the same. count_1: [1]."""
    dtype = compute_dtype(x_ND)
    return kernels.grouped_mlp(x_ND.to(dtype), w13_DF2[None].to(dtype), w2_FD[None].to(dtype), count_1)


def host_expert_forward(x_ND: torch.Tensor, w13_DF2: torch.Tensor, w2_FD: torch.Tensor,
                        count_1_host: torch.Tensor) -> torch.Tensor:
    """Run an expert on host cores from the store's (host) weights; activations move, weights don't."""
    if x_ND.device.type == "cpu":
        return expert_forward(x_ND, w13_DF2, w2_FD, count_1_host)
    dtype = compute_dtype(x_ND)
    x_host = x_ND.to("cpu", dtype)  # host sync: device->host copy of N activation rows
    y_host = expert_forward(x_host, w13_DF2, w2_FD, count_1_host)
    return y_host.to(x_ND.device, non_blocking=True)


@dataclass(frozen=True)
class Calibration:
    """Measured at start-up on this machine; JSON-able (recorded in traces and reports)."""

    device: str
    expert_bytes: int
    copy_s: float
    """Seconds to copy one expert from the host store into a device slot."""
    tokens: tuple[int, ...]
    """Token counts of the grid below."""
    host_s: tuple[float, ...]
    """Seconds for one expert on host cores, per grid token count."""
    device_s: tuple[float, ...]
    """Seconds for one expert on the device, per grid token count."""
    act_s_per_token: float
    """Seconds to move one token's activation to the host and its result back (0 when host = device)."""
    attn_s: float = 0.0
    """Seconds of non-expert compute per MoE layer at decode (the window a prefetch can hide in)."""

    @property
    def copy_gbps(self) -> float:
        return self.expert_bytes / max(self.copy_s, 1e-12) / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"], d["host_s"], d["device_s"] = list(self.tokens), list(self.host_s), list(self.device_s)
        d["copy_gbps"] = self.copy_gbps
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(device=str(d["device"]), expert_bytes=int(d["expert_bytes"]), copy_s=float(d["copy_s"]),
                   tokens=tuple(int(t) for t in d["tokens"]), host_s=tuple(float(s) for s in d["host_s"]),
                   device_s=tuple(float(s) for s in d["device_s"]),
                   act_s_per_token=float(d["act_s_per_token"]), attn_s=float(d.get("attn_s", 0.0)))


def interpolate(grid: tuple[int, ...], values: tuple[float, ...], n: int) -> float:
    """Piecewise-linear in n over the grid, extended linearly past both ends, never negative."""
    if len(grid) == 1:
        return values[0] * n / grid[0]
    i = 1
    while i < len(grid) - 1 and grid[i] < n:
        i += 1
    x0, x1, y0, y1 = grid[i - 1], grid[i], values[i - 1], values[i]
    return max(0.0, y0 + (y1 - y0) * (n - x0) / (x1 - x0))


class CostModel:
    """Chooses, for a miss routed N tokens, between waiting, copying and computing on the host."""

    def __init__(self, cal: Calibration):
        if len(cal.tokens) != len(cal.host_s) or len(cal.tokens) != len(cal.device_s) or not cal.tokens:
            raise ValueError("calibration grid, host_s and device_s must be non-empty and of equal length")
        self.cal = cal

    def host_time(self, n: int) -> float:
        return interpolate(self.cal.tokens, self.cal.host_s, n) + n * self.cal.act_s_per_token

    def device_time(self, n: int) -> float:
        return interpolate(self.cal.tokens, self.cal.device_s, n)

    def decide(self, n: int, inflight_remaining_s: float | None, allow_cpu: bool, *, queued_s: float = 0.0) -> str:
        """'wait' (copy already in flight), 'copy' (fetch now, behind `queued_s` of queued copies)
        or 'cpu' (run on host cores): whichever finishes first."""
        if inflight_remaining_s is not None:
            options = {"wait": inflight_remaining_s + self.device_time(n)}
        else:
            options = {"copy": queued_s + self.cal.copy_s + self.device_time(n)}
        if allow_cpu:
            options["cpu"] = self.host_time(n)
        return min(options, key=options.get)

    def prefers_copy(self, n: int) -> bool:
        return self.cal.copy_s + self.device_time(n) <= self.host_time(n)


def _median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def calibrate(store, pool, copy_engine, *, token_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
              repeats: int = 3, attn_probe: Callable[[], Any] | None = None) -> Calibration:
    """Measure copy, host and device expert times on this machine. Uses slot 0 of an empty pool."""
    dev = pool.device
    # host sync: calibration must wait for the device to time it (start-up only).
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def copy_once():
        copy_engine.wait(copy_engine.issue((0, 0), 0))
        copy_engine.synchronize()

    copy_s = _median_time(copy_once, repeats, sync)
    lay = store.layout
    host_s, device_s = [], []
    for n in token_grid:
        xh = torch.randn(n, lay.d_model).to(lay.dtype)
        ch = torch.tensor([n])
        host_s.append(_median_time(lambda: expert_forward(xh, store.w13(0, 0), store.w2(0, 0), ch), repeats, sync))
        xd, cd = xh.to(dev), ch.to(dev)
        device_s.append(_median_time(lambda: expert_forward(xd, pool.w13_SDF2[0], pool.w2_SFD[0], cd),
                                     repeats, sync))
    act = 0.0
    if dev.type != "cpu":
        xd = torch.randn(token_grid[-1], lay.d_model, dtype=lay.dtype, device=dev)
        act = _median_time(lambda: xd.to("cpu").to(dev), repeats, sync) / token_grid[-1]
    attn_s = _median_time(attn_probe, repeats, sync) if attn_probe is not None else 0.0
    # Calibration copies are not workload traffic.
    copy_engine.collect_stall()
    copy_engine.bytes_moved = copy_engine.copies = 0
    copy_engine.stall_s = 0.0
    return Calibration(device=str(dev), expert_bytes=lay.expert_bytes, copy_s=copy_s, tokens=tuple(token_grid),
                       host_s=tuple(host_s), device_s=tuple(device_s), act_s_per_token=act, attn_s=attn_s)


__all__ = ["Calibration", "CostModel", "calibrate", "expert_forward", "host_expert_forward", "interpolate",
           "DECISIONS"]
