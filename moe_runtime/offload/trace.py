"""Routing traces: which experts every token chose at every MoE layer, in msgpack.

Legend: N records (one per token per MoE layer), K top-k, L MoE layers, E experts.

A trace is a frozen, versioned dataclass; columns travel as little-endian byte strings (no pickle,
ever). The file is sealed by the project's integrity rule (core/serial.py): a sha256 over the whole
content is checked before anything is decoded, and the body is decoded with limits derived from
its size. Then every field is checked by type and range (L <= 4096, E <= 65536, K <= min(E, 256),
columns of the right length, ids in range, every declared layer present in the records, scores
finite, the known `meta` entries and the recorded calibration well-formed), so a corrupted, truncated, hand-edited, oversized or
wrong-version file is refused with a TraceError naming the file, never loaded or crashed on later.
`TraceRecorder` records from any MoETransformer forward (generation, evaluation, or
`trainer.model` during training) or is fed by the expert-cache engine. The `moe trace` command
(offload/trace_cli.py) records and simulates; this module never imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import math

import numpy as np
import torch

from moe_runtime.core.serial import DecodeError, seal, unseal
from moe_runtime.offload.predictor import LookaheadPredictor

TRACE_FORMAT = "moe-routing-trace"
TRACE_VERSION = 2
MAX_LAYERS, MAX_EXPERTS, MAX_TOP_K = 4096, 65536, 256
MAX_TRACE_OBJECTS = 65536
"""A trace body is ~20 fields (columns are byte strings) plus a small `meta`."""
MAX_TRACE_BYTES = 1 << 30
_COLUMNS = {"step": "<i4", "seq": "<i4", "pos": "<i4", "layer": "<u2", "experts": "<u2", "scores": "<f4"}
_KEYS = {"format", "version", "num_layers", "num_experts", "top_k", "num_records", "meta", *_COLUMNS, "lookahead"}
_LOOKAHEAD = "<i2"
"""Optional column: per record, the experts the lookahead predictor named for the record's layer at
distances 0..meta.lookahead_depth ([N, (depth + 1) * K], -1 where no prediction was made)."""


class TraceError(ValueError):
    """A trace file that is missing, corrupted, oversized or of an unsupported version."""


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    num_layers: int
    num_experts: int
    top_k: int
    step: np.ndarray
    """[N] forward pass the record came from."""
    seq: np.ndarray
    """[N] sequence id."""
    pos: np.ndarray
    """[N] token position in its sequence."""
    layer: np.ndarray
    """[N] MoE layer index."""
    experts: np.ndarray
    """[N, K] chosen expert ids."""
    scores: np.ndarray
    """[N, K] combine weights."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-able facts: model shape, expert_bytes, source, calibration (see cpu_experts)."""
    version: int = TRACE_VERSION
    lookahead: np.ndarray | None = None
    """[N, depth + 1, K] or None: the engine's default predictor (lookahead gating, offload/predictor.py)
    as recorded with the routing: experts predicted for the record's layer at distance d from the
    hidden state entering the MoE layer d earlier, -1 where none (TraceRecorder.attach(lookahead_depth=...))."""

    def __len__(self) -> int:
        return int(self.layer.shape[0])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": TRACE_FORMAT, "version": self.version, "num_layers": self.num_layers,
                             "num_experts": self.num_experts, "top_k": self.top_k, "num_records": len(self),
                             "meta": self.meta}
        for name, dt in _COLUMNS.items():
            d[name] = np.ascontiguousarray(getattr(self, name), dtype=dt).tobytes()
        if self.lookahead is not None:
            d["lookahead"] = np.ascontiguousarray(self.lookahead, dtype=_LOOKAHEAD).tobytes()
        return d

    @classmethod
    def from_dict(cls, d: Any, what: str = "trace") -> "RoutingTrace":
        """A trace from its decoded body; every field checked by type and range (TraceError naming `what`)."""
        if not isinstance(d, dict) or d.get("format") != TRACE_FORMAT:
            raise TraceError(f"{what} is not a routing trace (format {d.get('format') if isinstance(d, dict) else None!r}, "
                             f"expected {TRACE_FORMAT!r})")
        if d.get("version") != TRACE_VERSION:
            raise TraceError(f"{what} has trace version {d.get('version')!r}; this build reads version "
                             f"{TRACE_VERSION}; re-record it with this version of moe-runtime")
        unknown = sorted(set(d) - _KEYS, key=str)
        if unknown:
            raise TraceError(f"{what}: unknown field(s) {unknown}")
        L, E, K, N = (_int_field(d, k, what) for k in ("num_layers", "num_experts", "top_k", "num_records"))
        if not (1 <= L <= MAX_LAYERS and 1 <= E <= MAX_EXPERTS and 1 <= K <= min(E, MAX_TOP_K) and N >= 0):
            raise TraceError(f"{what}: num_layers={L}, num_experts={E}, top_k={K}, num_records={N} are out of range "
                             f"or inconsistent (1 <= L <= {MAX_LAYERS}, 1 <= K <= min(E, {MAX_TOP_K}), "
                             f"E <= {MAX_EXPERTS})")
        if "meta" not in d:
            raise TraceError(f"{what} is missing or mistypes field 'meta'")
        meta = _check_meta(d["meta"], what)
        cols = {}
        for name, dt in _COLUMNS.items():
            if name not in d:
                raise TraceError(f"{what} is missing or mistypes field {name!r}")
            cols[name] = _column(d[name], dt, name, what)
        for name, col in cols.items():
            want = N * K if name in ("experts", "scores") else N
            if col.size != want:
                raise TraceError(f"{what}: column {name!r} holds {col.size} values, expected {want} "
                                 f"(num_records={N}); the file is truncated or corrupted")
        cols["experts"], cols["scores"] = cols["experts"].reshape(N, K), cols["scores"].reshape(N, K)
        _check_values(cols, L, E, what)
        look = None
        if "lookahead" in d:
            depth = meta.get("lookahead_depth")
            if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth < L:
                raise TraceError(f"{what}: column 'lookahead' needs meta.lookahead_depth, an int in [0, {L})")
            raw = _column(d["lookahead"], _LOOKAHEAD, "lookahead", what)
            if raw.size != N * (depth + 1) * K:
                raise TraceError(f"{what}: column 'lookahead' holds {raw.size} values, expected "
                                 f"{N * (depth + 1) * K}; the file is truncated or corrupted")
            look = raw.reshape(N, depth + 1, K).astype(np.int64)
            if look.size and (look.min() < -1 or look.max() >= E):
                raise TraceError(f"{what}: column 'lookahead' holds expert ids out of range (E={E}); corrupted")
        return cls(L, E, K, meta=meta, lookahead=look, **{k: v.astype(np.int64) if k != "scores" else v.copy()
                                                         for k, v in cols.items()})

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(seal(self.to_dict(), TRACE_FORMAT, TRACE_VERSION))
        return p

    @classmethod
    def load(cls, path: str | Path, *, max_bytes: int = MAX_TRACE_BYTES) -> "RoutingTrace":
        p = Path(path)
        if not p.is_file():
            raise TraceError(f"trace file {p} does not exist")
        size = p.stat().st_size
        if size > max_bytes:
            raise TraceError(f"trace file {p} is {size} bytes, over the limit of {max_bytes} bytes; "
                             f"pass a larger max_bytes only for a file you trust")
        try:
            d = unseal(p.read_bytes(), TRACE_FORMAT, TRACE_VERSION, f"trace file {p}", max_bytes, MAX_TRACE_OBJECTS)
        except DecodeError as e:
            raise TraceError(f"trace file {p} is corrupted: {e}") from None
        except OSError as e:
            raise TraceError(f"trace file {p} cannot be read ({e.strerror})") from None
        return cls.from_dict(d, f"trace file {p}")

    def token_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens with every layer recorded, in first-seen order: choices [T, L, K], the row of each
        token's predecessor in its sequence (pos - 1) or -1, and the step each token ran in [T]."""
        rows: dict[tuple[int, int], np.ndarray] = {}
        seen: dict[tuple[int, int], int] = {}
        step: dict[tuple[int, int], int] = {}
        for i in range(len(self)):
            tok = (int(self.seq[i]), int(self.pos[i]))
            if tok not in rows:
                rows[tok] = np.zeros((self.num_layers, self.top_k), dtype=np.int64)
                seen[tok], step[tok] = 0, int(self.step[i])
            rows[tok][int(self.layer[i])] = self.experts[i]
            seen[tok] |= 1 << int(self.layer[i])
        full = (1 << self.num_layers) - 1
        toks = [t for t in rows if seen[t] == full]
        index = {t: i for i, t in enumerate(toks)}
        choices = (torch.from_numpy(np.stack([rows[t] for t in toks])) if toks
                   else torch.zeros(0, self.num_layers, self.top_k, dtype=torch.long))
        prev = torch.tensor([index.get((s, p - 1), -1) for s, p in toks], dtype=torch.long)
        return choices, prev, torch.tensor([step[t] for t in toks], dtype=torch.long)


def _column(raw: Any, dt: str, name: str, what: str) -> np.ndarray:
    if not isinstance(raw, bytes):
        raise TraceError(f"{what}: column {name!r} is {type(raw).__name__}, expected bytes")
    size = np.dtype(dt).itemsize
    if len(raw) % size:
        raise TraceError(f"{what}: column {name!r} has {len(raw)} bytes, not a multiple of {size}; corrupted")
    return np.frombuffer(raw, dtype=dt)


def _int_field(d: dict[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise TraceError(f"{what} is missing or mistypes field {key!r} ({type(v).__name__}, expected int)")
    return v


def _check_values(cols: dict[str, np.ndarray], L: int, E: int, what: str) -> None:
    """Ids in range, no expert twice in one record, scores finite."""
    if not cols["layer"].size:
        return
    exp = cols["experts"]
    if (cols["layer"].max() >= L or exp.max() >= E or min(cols[k].min() for k in ("pos", "seq", "step")) < 0):
        raise TraceError(f"{what}: layer or expert ids out of range (L={L}, E={E}), or a negative "
                         f"step/seq/pos; the file is corrupted")
    if exp.shape[1] > 1 and (np.diff(np.sort(exp, axis=1), axis=1) == 0).any():
        raise TraceError(f"{what}: a record lists the same expert twice; the file is corrupted")
    if not np.isfinite(cols["scores"]).all():
        raise TraceError(f"{what}: column 'scores' holds NaN or infinity; the file is corrupted")
    held = np.unique(cols["layer"])
    if held.size != L:  # ids are < L (checked above), so fewer distinct ids means a layer without records
        missing = sorted(set(range(L)) - set(held.tolist()))
        raise TraceError(f"{what}: the header declares num_layers={L}, but the records hold {held.size} MoE "
                         f"layer(s) (no record for layer {missing[:5]}{' ...' if len(missing) > 5 else ''}); "
                         f"the header or the records were edited — re-record the trace")


_META_TYPES = {"d_model": int, "d_expert": int, "expert_bytes": int, "dtype": str, "router_position": str,
               "source": str, "run": str, "calibration": dict, "lookahead_depth": int}
_CAL_FLOATS = ("copy_s", "act_s_per_token", "attn_s", "copy_gbps")


def _check_meta(meta: Any, what: str) -> dict[str, Any]:
    """meta: a map; the entries the simulator and engine read have the right types and ranges."""
    if not isinstance(meta, dict):
        raise TraceError(f"{what}: field 'meta' is {type(meta).__name__}, expected a map")
    for key, kind in _META_TYPES.items():
        v = meta.get(key)
        if key in meta and (not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0)):
            raise TraceError(f"{what}: meta.{key}={v!r:.60} should be a {'non-negative ' if kind is int else ''}"
                             f"{kind.__name__}")
    if "calibration" in meta:
        _check_calibration(meta["calibration"], f"{what}: meta.calibration")
    return meta


def _check_calibration(cal: dict[str, Any], what: str) -> None:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    if not isinstance(cal.get("device"), str) or not isinstance(cal.get("expert_bytes"), int) \
            or isinstance(cal.get("expert_bytes"), bool) or cal["expert_bytes"] < 0:
        raise TraceError(f"{what}: device must be a str and expert_bytes a non-negative int")
    bad = [k for k in _CAL_FLOATS if k in cal and not number(cal[k])]
    if bad or "copy_s" not in cal or "act_s_per_token" not in cal:
        raise TraceError(f"{what}: {bad or ['copy_s', 'act_s_per_token']} must be finite non-negative numbers")
    grid = cal.get("tokens")
    if not isinstance(grid, list) or not grid or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                                                         for t in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
        raise TraceError(f"{what}: tokens must be a non-empty increasing list of positive ints")
    for key in ("host_s", "device_s"):
        v = cal.get(key)
        if not isinstance(v, list) or len(v) != len(grid) or not all(number(x) for x in v):
            raise TraceError(f"{what}: {key} must be {len(grid)} finite non-negative numbers (one per token count)")


class TraceRecorder:
    """Collects routing records; `attach(model)` hooks a MoETransformer, or call begin_forward/add."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, max_records: int | None = None,
                 meta: dict[str, Any] | None = None):
        self.L, self.E, self.K, self.max_records = num_layers, num_experts, top_k, max_records
        self.meta = dict(meta or {})
        self.chunks: list[tuple[int, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]] = []
        self.records = self.steps = 0
        self.seq_base, self._B, self._S, self._start = 0, 0, 0, 0
        self._handles: list = []
        self.look_depth: int | None = None
        self._look: dict[tuple[int, int], np.ndarray] = {}
        """(target layer, distance) -> [T, K] lookahead prediction made this pass, until the target routes."""

    def begin_forward(self, B: int, S: int, start: int) -> None:
        """A forward pass over [B, S] tokens at positions start..; start 0 opens new sequences."""
        if start == 0 and self.steps:
            self.seq_base += self._B
        self._B, self._S, self._start = B, S, start
        self.steps += 1

    def add(self, layer: int, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor) -> None:
        if self.max_records is not None and self.records >= self.max_records:
            return
        idx = topk_idx_TK.detach().to("cpu", torch.int64).numpy()  # host sync (recording only)
        w = topk_w_TK.detach().to("cpu", torch.float32).numpy()
        T = idx.shape[0]
        rows = np.arange(T)
        seq = self.seq_base + rows // max(self._S, 1)
        pos = self._start + rows % max(self._S, 1)
        look = None
        if self.look_depth is not None:
            look = np.full((T, self.look_depth + 1, self.K), -1, dtype=np.int64)
            for d in range(self.look_depth + 1):
                p = self._look.pop((layer, d), None)
                if p is not None and p.shape == (T, self.K):
                    look[:, d] = p
        self.chunks.append((self.steps - 1, seq, pos, layer, idx, w, look))
        self.records += T

    def _lookahead(self, predictor, block: int, h_BSD: torch.Tensor) -> None:
        for j, d, idx, _w in predictor.predict_topk(block, h_BSD):
            self._look[(j, d)] = idx.detach().to("cpu", torch.int64).numpy()  # host sync (recording only)

    def note_lookahead(self, raw) -> None:
        """Record predictions made elsewhere ((target layer, distance, topk_idx_TK, topk_w_TK), as
        LookaheadPredictor.predict_topk gives them) as the coming records' lookahead column: the
        expert-cache engine records exactly what it submitted (set look_depth first)."""
        for j, d, idx, _w in raw:
            self._look[(j, d)] = idx.detach().to("cpu", torch.int64).numpy()  # host sync (recording only)

    def attach(self, model, *, lookahead_depth: int | None = None) -> "TraceRecorder":
        """Record the model's routing; with `lookahead_depth`, also what the engine's default
        predictor (lookahead gating at that depth) names before each MoE layer, so `moe trace
        simulate` can replay the engine's own predictions (RoutingTrace.lookahead)."""
        moe = [b.ffn for b in model.blocks if b.is_moe]
        if lookahead_depth is not None:
            look = LookaheadPredictor(model, lookahead_depth)
            self.look_depth = lookahead_depth
            self.meta["lookahead_depth"] = lookahead_depth
            for b, block in enumerate(model.blocks):
                self._handles.append(block.register_forward_pre_hook(
                    lambda _m, args, b=b: self._lookahead(look, b, args[0])))

        def pre(_mod, args, kwargs):
            tokens = args[0] if args else kwargs["tokens_BS"]
            cache = args[1] if len(args) > 1 else kwargs.get("cache")
            self.begin_forward(tokens.shape[0], tokens.shape[1], cache.length if cache is not None else 0)

        self._handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        for m, layer in enumerate(moe):
            self._handles.append(layer.router.register_forward_hook(
                lambda _mod, _inp, out, m=m: self.add(m, out.topk_idx_TK, out.topk_w_TK)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def to_trace(self) -> RoutingTrace:
        cols: dict[str, list[np.ndarray]] = {k: [] for k in _COLUMNS}
        looks = [c[6] for c in self.chunks]
        for step, seq, pos, layer, idx, w, _ in self.chunks:
            n = idx.shape[0]
            cols["step"].append(np.full(n, step))
            cols["seq"].append(seq)
            cols["pos"].append(pos)
            cols["layer"].append(np.full(n, layer))
            cols["experts"].append(idx)
            cols["scores"].append(w)
        empty = {"experts": np.zeros((0, self.K)), "scores": np.zeros((0, self.K))}
        arrays = {k: np.concatenate(v) if v else empty.get(k, np.zeros(0)) for k, v in cols.items()}
        arrays = {k: v.astype(np.float32 if k == "scores" else np.int64) for k, v in arrays.items()}
        look = None
        if self.look_depth is not None:
            look = (np.concatenate(looks) if looks else np.zeros((0, self.look_depth + 1, self.K), dtype=np.int64))
        return RoutingTrace(self.L, self.E, self.K, meta=self.meta, lookahead=look, **arrays)


def recorder_for(model, **kw) -> TraceRecorder:
    """A recorder sized for this model, with its shape in meta."""
    cfg = model.cfg
    meta = {"d_model": cfg.d_model, "d_expert": cfg.moe.d_expert, "router_position": cfg.moe.router_position,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    meta.update(kw.pop("meta", {}) or {})
    return TraceRecorder(cfg.num_moe_layers, cfg.moe.num_experts, cfg.moe.top_k, meta=meta, **kw)


__all__ = ["RoutingTrace", "TraceRecorder", "TraceError", "recorder_for", "TRACE_VERSION", "TRACE_FORMAT",
           "MAX_TRACE_BYTES"]
