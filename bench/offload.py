"""Expert-cache benchmark (issue 5): tokens/s and hit rate of every policy at several cache sizes.

    python bench/offload.py                  # CUDA: Mixtral-8x7B-shaped 4-layer bf16 model + a trained model
    python bench/offload.py --cpu-smoke      # the same pipeline on tiny models on CPU (labelled as such)
    python bench/offload.py --cpu-smoke --models mixtral4 --caches 25,50 --modes lru,predictive,predictive+cpu \
        --tag cpu_transformers               # issue 11's rows: ours vs transformers + our cache, CPU plumbing

Per model and batch (1 and 8): all experts resident; LRU, LFU, predictive and predictive + host
experts at caches of 25 / 50 / 75 % of all experts; and, when transformers + accelerate import,
Hugging Face Mixtral fully resident, with its experts offloaded by accelerate (device_map with
every `experts` module on "cpu"; CUDA only), and with our expert cache plugged into its experts
(`hf+cache MODE` rows: offload/transformers_cache.py, same cache sizes, model.generate()). Next to
each of our cache runs: the simulator's projection for the same routing with the measured
calibration (on a GPU this checks the model of offload/decision.py; on CPU only the plumbing,
since host "copies" are memcpys), and the physical bound from its own misses,
max(resident decode time, bytes moved / measured copy bandwidth). Results go to
bench/results/offload_<device>.{json,md} with the device name and date. Timings are wall clock
around whole generations after one warm-up generation (the CUDA device is synchronised at both
ends).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_runtime.core.config import ModelConfig, MoEConfig, get_preset  # noqa: E402
from moe_runtime.core.model import KVCache, MoETransformer, rotary_tables, sample_next  # noqa: E402
from moe_runtime.offload.engine import ExpertCacheEngine  # noqa: E402
from moe_runtime.offload.report import device_name, utc_now  # noqa: E402
from moe_runtime.offload.store import HostExpertStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"lru": ("lru", False), "lfu": ("lfu", False), "predictive": ("predictive", False),
         "predictive+cpu": ("predictive", True)}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # host sync: timing boundary


def init_random(model: torch.nn.Module, std: float = 0.02) -> None:
    """Weights of a model built on the meta device: normal matrices, unit norms, real rotary tables."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std) if p.ndim >= 2 else p.fill_(1.0)
        if hasattr(model, "rope_cos"):
            cos, sin = rotary_tables(model.cfg.head_dim, model.cfg.max_seq_len, model.cfg.rope_theta)
            model.rope_cos.copy_(cos)
            model.rope_sin.copy_(sin)


def build_random(cfg: ModelConfig, dev: torch.device, dtype: torch.dtype) -> MoETransformer:
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to(dtype).to_empty(device=dev)  # no full-precision copy is ever materialised
    init_random(model)
    return model.eval()


def build_trained(args, dev: torch.device) -> MoETransformer:
    from moe_runtime.core.train import Trainer, load_model
    if args.trained_checkpoint:
        return load_model(args.trained_checkpoint, device=dev)[0]
    run = get_preset("tiny")
    if args.cpu_smoke:
        run.model = tiny_cfg()
        run.train.batch_size, run.train.seq_len = 8, 32
    run.train.max_steps, run.train.eval_interval, run.train.ckpt_interval = args.trained_steps, 10**6, 10**6
    run.train.device = str(dev)
    trainer = Trainer(run, out_dir=tempfile.mkdtemp(prefix="bench-offload-"), progress=False, plots=False)
    trainer.fit()
    return trainer.model.eval()


def tiny_cfg() -> ModelConfig:
    return ModelConfig(d_model=64, n_layers=4, n_heads=4, max_seq_len=128,
                       moe=MoEConfig(num_experts=8, top_k=2, d_expert=64))


def mixtral4_cfg() -> ModelConfig:
    cfg = get_preset("mixtral-8x7b").model
    cfg.n_layers, cfg.max_seq_len = 4, 512
    return cfg


@torch.no_grad()
def time_resident(model: MoETransformer, prompt: torch.Tensor, new: int) -> dict:
    """Greedy decode with all experts on the device: prefill, then `new` decode steps, timed apart."""
    dev = prompt.device
    B, S = prompt.shape
    cache = KVCache.empty(model.cfg, B, S + new + 1, dev, model.embed.weight.dtype)
    logits = model(prompt, cache).logits[:, -1]
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(new):
        logits = model(sample_next(logits, 0.0, None, None)[:, None], cache).logits[:, -1]
    sync(dev)
    dt = time.perf_counter() - t0
    return {"mode": "resident", "decode_tokens_per_s": B * new / dt, "decode_s": dt}


def run_engine(model, store, cal, prompt, new: int, mode: str, slots: int, dev) -> tuple[dict, object]:
    policy, cpu = MODES[mode]
    engine = ExpertCacheEngine(model, gpu_expert_slots=slots, policy=policy, cpu_experts=cpu, device=dev,
                               store=store, calibration=cal)
    engine.generate(prompt, 4)  # warm-up: kernels, allocator, a realistic cache state
    rep = engine.generate(prompt, new + 1).report
    engine.close()
    p = rep["prediction"]
    row = {"mode": mode, "slots": slots, "cache_fraction": rep["cache_fraction"],
           "decode_tokens_per_s": rep["decode_tokens_per_s"], "decode_s": rep["decode_s"], "hit_rate": rep["hit_rate"],
           "gib_moved": rep["gib_moved"], "bytes_moved": rep["bytes_moved"], "stall_ms": rep["stall_s"] * 1e3,
           "precision": p["precision"], "recall": p["recall"], "decisions": rep["decisions"],
           "stream_steps": rep["decode"]["stream_steps"], "cpu_served": rep["decode"]["cpu_served"]}
    return row, engine.calibration


def projected(model, store, cal, prompt, new: int, mode: str, slots: int, dev) -> float | None:
    """The simulator's tokens/s for the same generation: routing recorded by a separate full-capacity
    engine (recording syncs the host, so never in the timed run), replayed with the measured
    calibration through the engine's own Planner (offload/simulate.py). Decode passes of the
    warm-up and the timed generation together; the learned predictor stands in for lookahead."""
    from moe_runtime.offload.simulate import simulate
    total = store.layout.total_experts
    rec = ExpertCacheEngine(model, gpu_expert_slots=total, policy="lru", device=dev, store=store, calibration=cal,
                            record_trace=True)
    rec.generate(prompt, 4)
    rec.generate(prompt, new + 1)
    rec.close()
    r = simulate(rec.trace(), MODES[mode][0], slots, cal, cpu_experts=MODES[mode][1])
    d = r["decode"]
    return d["tokens"] / d["time_s"] if d["time_s"] else None


def bench_model(name: str, model: MoETransformer, args, dev: torch.device) -> dict:
    """Every mode x cache x batch for one of our models; the HF rows are added by the caller."""
    cfg = model.cfg
    total = cfg.num_moe_layers * cfg.moe.num_experts
    resident = {}
    for B in args.batches:
        prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        resident[B] = time_resident(model, prompt.to(dev), args.new_tokens)
    banks = [b.ffn.experts for b in model.blocks if b.is_moe]
    store = HostExpertStore.from_banks(banks, pin=dev.type == "cuda")
    del banks
    rows, cal = [], None
    for B in args.batches:
        prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        res = resident[B]
        rows.append({"batch": B, **res, "cache_fraction": 1.0})
        for frac in args.caches:
            slots = max(1, round(frac / 100 * total))
            for mode in args.modes:
                row, cal = run_engine(model, store, cal, prompt, args.new_tokens, mode, slots, dev)
                row["batch"] = B
                bound_s = max(res["decode_s"], row["bytes_moved"] / max(cal.expert_bytes / cal.copy_s, 1e-9))
                row["bound_tokens_per_s"] = B * args.new_tokens / bound_s
                row["fraction_of_bound"] = bound_s / row["decode_s"]
                row["projected_tokens_per_s"] = projected(model, store, cal, prompt, args.new_tokens, mode, slots, dev)
                rows.append(row)
                print(f"{name} B={B} {mode:>15} cache {frac:>3}% ({slots} slots): "
                      f"{row['decode_tokens_per_s']:9.2f} tok/s, hit {row['hit_rate']:.3f}, "
                      f"{row['gib_moved']:.3f} GiB moved, bound {row['bound_tokens_per_s']:.2f} tok/s", flush=True)
    return {"config": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "experts": cfg.moe.num_experts,
                       "top_k": cfg.moe.top_k, "d_expert": cfg.moe.d_expert,
                       "dtype": str(model.embed.weight.dtype).removeprefix("torch.")},
            "store": store.report(), "calibration": cal.to_dict() if cal else None, "rows": rows}


def export_for_hf(model: MoETransformer, args) -> str | None:
    """Our model as a Mixtral checkpoint in a temp dir, so the transformers rows run the same weights
    (CPU smoke, or --hf-same-weights: a real-size export writes every expert to disk); None when an
    aux-free bias has no transformers twin."""
    if not (args.cpu_smoke or args.hf_same_weights) or model.cfg.moe.aux_free_bias:
        return None
    from moe_runtime.core.hf import export_hf
    with torch.no_grad():  # to_empty left the unused (aux_free_bias=False) bias buffers unset
        for layer in model.moe_layers():
            layer.router.bias_E.zero_()
    source = str(Path(tempfile.mkdtemp(prefix="bench-offload-hf-")) / "ck")
    export_hf(model, model.cfg, source, family="mixtral")
    return source


def _hf_mixtral(mc, dtype: torch.dtype, place, source: str | None):
    """Random weights, or (source) our model's weights exported as a Mixtral checkpoint."""
    from transformers import MixtralForCausalLM
    if source is not None:
        return MixtralForCausalLM.from_pretrained(source, dtype=dtype).to(place).eval()
    with torch.device("meta"):
        model = MixtralForCausalLM(mc)
    model = model.to(dtype).to_empty(device=place)
    init_random(model)
    rot = model.model.rotary_emb  # its inv_freq buffer was computed on the meta device: rebuild it
    model.model.rotary_emb = type(rot)(mc).to(place)
    return model.eval()


def _time_hf(model, ids, args, dev) -> tuple[float, dict | None]:
    """Decode seconds for args.new_tokens tokens: generate(new + 1) minus generate(1), after a warm-up.
    With the expert cache, also its report of the longer generation."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    times, rep = [], None
    for n in (1, args.new_tokens + 1):
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(dev)
        times.append(time.perf_counter() - t0)
        if getattr(model, "expert_cache", None) is not None:
            rep = model.expert_cache.report()  # statistics of the generation just timed
    return max(times[1] - times[0], 1e-9), rep


def hf_rows(cfg: ModelConfig, args, dev: torch.device, dtype: torch.dtype, source: str | None = None) -> list[dict]:
    """Hugging Face Mixtral with the same shapes (and, given `source`, our model's weights): fully on
    the device, accelerate CPU offload (CUDA only), and the same transformers model with our expert
    cache plugged into its experts (offload/transformers_cache.py) at every cache size and mode.
    Prompts are our rows' prompts, so with the same weights the cache statistics compare."""
    try:
        from transformers import MixtralConfig
        import accelerate
        from moe_runtime.offload.config import OffloadConfig
        from moe_runtime.offload.transformers_cache import enable_expert_cache
    except ImportError as e:
        return [{"mode": "hf", "skipped": f"transformers/accelerate not importable: {e}"}]
    mc = MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.moe.d_expert,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, num_local_experts=cfg.moe.num_experts,
                       num_experts_per_tok=cfg.moe.top_k, max_position_embeddings=cfg.max_seq_len,
                       rope_theta=cfg.rope_theta)
    places = [("hf-resident", dev, None)] + ([("hf-accelerate-offload", "cpu", None)] if dev.type == "cuda" else [])
    places += [(f"hf+cache {mode}", "cpu", (frac, mode)) for frac in args.caches for mode in args.modes
               if mode in args.hf_cache_modes]
    rows = []
    for mode, place, cache in places:
        model = _hf_mixtral(mc, dtype, place, source)
        if mode == "hf-accelerate-offload":
            dmap = {n: ("cpu" if n.split(".")[-1] == "experts" else 0) for n, m in model.named_modules()
                    if any(True for _ in m.parameters(recurse=False))}
            model = accelerate.dispatch_model(model, device_map=dmap, main_device=0)
        if cache is not None:
            policy, cpu = MODES[cache[1]]
            enable_expert_cache(model, OffloadConfig(expert_fraction=cache[0] / 100, policy=policy, cpu_experts=cpu,
                                                     device=dev))
        for B in args.batches:
            ids = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
            ids = ids.to(dev)  # our rows' prompts (generate gets an explicit all-ones attention mask)
            dt, rep = _time_hf(model, ids, args, dev)
            row = {"mode": mode, "batch": B, "decode_tokens_per_s": B * args.new_tokens / dt, "decode_s": dt,
                   "transformers": __import__("transformers").__version__,
                   "weights": "ours (exported)" if source else "random"}
            if rep is not None:
                row.update(cache_fraction=rep["cache_fraction"], slots=rep["slots"], hit_rate=rep["hit_rate"],
                           gib_moved=rep["gib_moved"], bytes_moved=rep["bytes_moved"], stall_ms=rep["stall_s"] * 1e3,
                           precision=rep["prediction"]["precision"], recall=rep["prediction"]["recall"],
                           decisions=rep["decisions"])
            rows.append(row)
            print(f"hf B={B} {mode}{'' if cache is None else f' cache {cache[0]}%'}: "
                  f"{row['decode_tokens_per_s']:.2f} tok/s", flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def targets(rows: list[dict], batch: int) -> list[dict]:
    """Issue 5's targets at the 25 % cache, computed from the measured rows of one model."""
    def get(mode, frac=None):
        for r in rows:
            if r.get("batch") == batch and r["mode"] == mode and (frac is None or abs(r["cache_fraction"] - frac) < 0.05):
                return r
        return None
    pred, lru = get("predictive", 0.25), get("lru", 0.25)
    hf, acc, hf_cache = get("hf-resident"), get("hf-accelerate-offload"), get("hf+cache predictive", 0.25)
    out = []
    def add(name, value, target):
        out.append({"batch": batch, "name": name, "value": value, "target": target,
                    "met": None if value is None else value >= target})
    if pred and lru:
        add("predictive / LRU tokens/s at 25%", pred["decode_tokens_per_s"] / lru["decode_tokens_per_s"], 2.0)
        add("bound / measured time (predictive, 25%)", pred["fraction_of_bound"], 1 / 1.5)
    if pred and hf:
        add("predictive at 25% / HF resident tokens/s", pred["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 1.0)
    if pred and acc:
        add("predictive at 25% / accelerate offload tokens/s",
            pred["decode_tokens_per_s"] / acc["decode_tokens_per_s"], 20.0)
    if hf_cache and acc:  # issue 11: the same transformers model, our cache in place of accelerate's offload
        add("transformers + our cache (predictive, 25%) / accelerate offload tokens/s",
            hf_cache["decode_tokens_per_s"] / acc["decode_tokens_per_s"], 1.0)
    return out


def _cell(row: dict, key: str, spec: str) -> str:
    return "" if row.get(key) is None else format(row[key], spec)


def markdown(res: dict) -> str:
    lines = [f"# Expert cache: {res['device_name']}, {res['date']}", "", res["note"], "",
             f"torch {res['torch']}; {res['new_tokens']} decode tokens after a {res['prompt_len']}-token prompt; "
             f"tokens/s = batch x decode tokens / decode wall time.", ""]
    for name, m in res["models"].items():
        c = m["config"]
        cal = m.get("calibration") or {}
        lines += [f"## {name}: L={c['n_layers']} D={c['d_model']} E={c['experts']} K={c['top_k']} F={c['d_expert']} "
                  f"{c['dtype']}; host store {m['store']['total_gib']:.3f} GiB; measured copy "
                  f"{cal.get('copy_gbps', float('nan')):.2f} GB/s", "",
                  "| batch | mode | cache | tok/s | projected tok/s | hit rate | GiB moved | stall ms | prefetch P / R | "
                  "bound tok/s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            if "skipped" in r:
                lines.append(f"| | {r['mode']} | | skipped: {r['skipped']} | | | | | | |")
                continue
            pr = "" if r.get("precision") is None else f"{r['precision']:.2f} / {r['recall']:.2f}"
            cells = [_cell(r, "cache_fraction", ".0%"), f"{r['decode_tokens_per_s']:.2f}",
                     _cell(r, "projected_tokens_per_s", ".2f"), _cell(r, "hit_rate", ".3f"),
                     _cell(r, "gib_moved", ".3f"), _cell(r, "stall_ms", ".1f"), pr, _cell(r, "bound_tokens_per_s", ".2f")]
            lines.append(f"| {r['batch']} | {r['mode']} | " + " | ".join(cells) + " |")
        for t in m.get("targets", []):
            v = "n/a" if t["value"] is None else f"{t['value']:.2f}"
            lines.append(f"\ntarget (batch {t['batch']}): {t['name']} = {v} (want >= {t['target']:.2f}): "
                         f"{'met' if t['met'] else 'NOT met'}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """1. parse and refuse a GPU run without CUDA, 2. per model: build, time resident and every cache
    mode (bench_model), add the Hugging Face rows, compute the targets, 3. write JSON + markdown."""
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU; writes offload_cpu.{json,md}")
    p.add_argument("--models", default="mixtral4,trained", help="comma-separated: mixtral4, trained")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--caches", default="25,50,75", help="cache sizes, percent of all experts")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 32 GPU, 24 CPU)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--trained-checkpoint", default=None, help="run dir of a trained model (else trains `tiny`)")
    p.add_argument("--trained-steps", type=int, default=None, help="steps for the quickly trained model")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
    p.add_argument("--hf-cache-modes", default="lru,predictive,predictive+cpu",
                   help="modes of the transformers model with our expert cache (rows 'hf+cache MODE')")
    p.add_argument("--hf-same-weights", action="store_true",
                   help="give the transformers rows our model's weights (export to a temp dir; always on with "
                        "--cpu-smoke) so their cache statistics compare with ours")
    p.add_argument("--tag", default=None, help="results file name: offload_<tag>.{json,md} (default: the device)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/offload.py measures the expert cache on a CUDA GPU (issue 5: H100) and this machine has no "
              "CUDA device. Run `python bench/offload.py --cpu-smoke` for the same pipeline on tiny CPU models.",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.caches = [int(c) for c in args.caches.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    args.hf_cache_modes = [m for m in args.hf_cache_modes.split(",") if m]
    bad = [m for m in args.modes + args.hf_cache_modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    args.new_tokens = args.new_tokens or (24 if args.cpu_smoke else 32)
    args.trained_steps = args.trained_steps or (40 if args.cpu_smoke else 300)
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    res = {"device": str(dev), "device_name": device_name(dev), "date": utc_now(), "torch": torch.__version__,
           "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "new_tokens": args.new_tokens,
           "prompt_len": args.prompt_len, "threads": torch.get_num_threads(), "models": {},
           "note": ("CPU SMOKE RUN: tiny models on CPU, the host plays the device; these numbers check the pipeline "
                    "and are not performance results. Rows 'hf+cache MODE' are the transformers model (our "
                    "model's weights, exported as Mixtral) with our expert cache in its experts; on CPU they "
                    "check the plumbing only (no GPU: accelerate's offload row needs CUDA and is absent)."
                    if args.cpu_smoke else
                    "Mixtral-8x7B-shaped model with 4 layers and random weights, and a trained model.")}
    for name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        if name == "mixtral4":
            cfg = tiny_cfg() if args.cpu_smoke else mixtral4_cfg()
            model, label = build_random(cfg, dev, dtype), ("tiny-random" if args.cpu_smoke else "mixtral4-random")
        elif name == "trained":
            model, label = build_trained(args, dev), ("tiny-trained" if args.cpu_smoke else "trained")
        else:
            raise SystemExit(f"--models: unknown model {name!r}; use mixtral4 and/or trained")
        source = export_for_hf(model, args) if name == "mixtral4" and not args.no_hf else None
        res["models"][label] = bench_model(label, model, args, dev)  # its experts end in the engines' store
        if name == "mixtral4" and not args.no_hf:
            cfg = model.cfg
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            res["models"][label]["rows"] += hf_rows(cfg, args, dev, dtype, source)
        if not args.cpu_smoke:
            res["models"][label]["targets"] = [t for B in args.batches for t in targets(res["models"][label]["rows"], B)]
    tag = args.tag or ("cpu" if args.cpu_smoke else re.sub(r"[^a-z0-9]+", "_", res["device_name"].lower()).strip("_"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"offload_{tag}.json").write_text(json.dumps(res, indent=2))
    (RESULTS / f"offload_{tag}.md").write_text(markdown(res))
    print(f"wrote {RESULTS / f'offload_{tag}.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
