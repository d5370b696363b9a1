"""Mixed int8 / int4 experts vs uniform int4 at equal bytes (issue 20 item 5): does it beat?

    python bench/quant_mixed.py                  # writes bench/results/quant_mixed.{json,md}
    python bench/quant_mixed.py --steps 60       # a quick look (less trained model)
    python bench/quant_mixed.py --render         # the .md again from the .json

The scheme: rank every (layer, expert) by its calibration frequency (tokens routed to it on
calibration text that is not the scored text), give the hottest ones int8 and the rest int4 with a
coarser group, as many int8 experts as fit the byte budget of a uniform int4 scheme. Compared AT
EQUAL BYTES (exact bytes from kernels/quant.expert_bytes; the mixed scheme never exceeds the budget):
    budget int4/32 (uniform int4, group 32): mixed = int8 hot + int4/128 cold, and int8 hot + int4/64 cold
    budget int4/64 (the default int4):      mixed = int8 hot + int4/128 cold
plus a control with the same number of int8 experts chosen at random (does frequency matter?).
Quality exactly as bench/quant_quality.py scores it (its helpers): experts quantised and dequantised
(fake quantisation: what the expert cache computes with), then mean token NLL vs the float model, KL
(float || quantised), top-1 agreement (teacher forced) and greedy agreement over free-running tokens,
on the tiny model that bench trains and on its random HF Mixtral (and --hf-seeds - 1 more random
Mixtrals of other weight seeds: one model's comparison is within quantisation noise). Verdict rule
(fixed after a 20-step smoke run): the mixed scheme beats uniform int4 if its KL is lower than the
uniform scheme of the same budget on EVERY model and its top-1 agreement is not lower on average.
Only then is it worth wiring into the store.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quant_quality as qq  # noqa: E402  (its models and scoring helpers)

from moe_runtime.core.config import get_preset  # noqa: E402
from moe_runtime.core.train import Trainer  # noqa: E402
from moe_runtime.kernels import quant as kq  # noqa: E402
from moe_runtime.offload.report import cpu_model, utc_now  # noqa: E402

SCHEMES = [  # (name, budget format, hot format, cold format)
    ("uniform int4/32", ("int4", 32), None, ("int4", 32)),
    ("mixed int8 + int4/128 @ int4/32 bytes", ("int4", 32), ("int8", None), ("int4", 128)),
    ("mixed int8 + int4/64 @ int4/32 bytes", ("int4", 32), ("int8", None), ("int4", 64)),
    ("uniform int4/64", ("int4", 64), None, ("int4", 64)),
    ("mixed int8 + int4/128 @ int4/64 bytes", ("int4", 64), ("int8", None), ("int4", 128)),
]


def moe_layers(model):
    return [b.ffn for b in model.blocks if b.is_moe]


@torch.no_grad()
def frequencies(model, x_BS: torch.Tensor) -> torch.Tensor:
    """[L, E] tokens routed to each expert of each MoE layer on x (the calibration text)."""
    layers = moe_layers(model)
    counts = torch.zeros(len(layers), layers[0].experts.num_experts)

    def count(m: int, out) -> None:  # returns None: a forward hook's return value would replace the output
        counts[m] += torch.bincount(out.topk_idx_TK.flatten().cpu(), minlength=counts.shape[1]).float()

    hooks = [ly.router.register_forward_hook(lambda _m, _i, out, m=m: count(m, out)) for m, ly in enumerate(layers)]
    try:
        model(x_BS)
    finally:
        for h in hooks:
            h.remove()
    return counts


def plan(freq_LE: torch.Tensor, D: int, Fh: int, budget, hot, cold, *, order: list | None = None):
    """Per (layer, expert) format: the hottest keys int8 while the total stays within the budget's bytes.
    Returns ({(m, e): (fmt, group)}, bytes used, budget bytes)."""
    L, E = freq_LE.shape
    cap = L * E * kq.expert_bytes(D, Fh, *budget)
    keys = order if order is not None else sorted(((m, e) for m in range(L) for e in range(E)),
                                                  key=lambda k: -float(freq_LE[k]))
    fmt = {k: cold for k in keys}
    used = L * E * kq.expert_bytes(D, Fh, *cold)
    if hot is not None:
        step = kq.expert_bytes(D, Fh, *hot) - kq.expert_bytes(D, Fh, *cold)
        for k in keys:
            if used + step > cap:
                break
            fmt[k], used = hot, used + step
    assert used <= cap, (used, cap)
    return fmt, used, cap


@torch.no_grad()
def fake_quantise(model, fmt: dict) -> None:
    """Each expert's weights := dequantise(quantise(w)) in its own format (in place)."""
    for m, ly in enumerate(moe_layers(model)):
        bank = ly.experts
        for e in range(bank.num_experts):
            f, g = fmt[(m, e)]
            qe = kq.quantize_experts(bank.w13_EDF2[e:e + 1], bank.w2_EFD[e:e + 1], f, g)
            w13, w2 = qe.dequantize(bank.w13_EDF2.dtype)
            bank.w13_EDF2[e:e + 1].copy_(w13)
            bank.w2_EFD[e:e + 1].copy_(w2)


@torch.no_grad()
def score(model, q, x_BS, y_BS, prompts_BS, ref_gen, n_gen: int) -> dict:
    """bench/quant_quality.py's metrics of q against the float model."""
    ref = qq._logits(model, x_BS)
    ref_nll = float(F.cross_entropy(ref.flatten(0, 1), y_BS.flatten()))
    lg = qq._logits(q, x_BS)
    nll = float(F.cross_entropy(lg.flatten(0, 1), y_BS.flatten()))
    rl, ql = ref.log_softmax(-1), lg.log_softmax(-1)
    gen = qq._greedy(q, prompts_BS, n_gen)
    return {"mean_nll": nll, "float_nll": ref_nll, "nll_increase_pct": 100 * (nll - ref_nll) / ref_nll,
            "kl": float((rl.exp() * (rl - ql)).sum(-1).mean()),
            "top1_agreement": float((lg.argmax(-1) == ref.argmax(-1)).float().mean()),
            "greedy_agreement": float((gen == ref_gen).float().mean())}


def study(name: str, model, calib_BS, x_BS, y_BS, prompts_BS, n_gen: int, seed: int) -> dict:
    freq = frequencies(model, calib_BS)
    bank = moe_layers(model)[0].experts
    D, Fh = bank.d_model, bank.d_expert
    ref_gen = qq._greedy(model, prompts_BS, n_gen)
    share = freq / freq.sum()
    rows = []
    for label, budget, hot, cold in SCHEMES:
        variants = [(label, None)]
        if hot is not None:  # the control: as many int8 experts, chosen at random
            keys = [(m, e) for m in range(freq.shape[0]) for e in range(freq.shape[1])]
            random.Random(seed).shuffle(keys)
            variants.append((label.replace("mixed", "random-hot"), keys))
        for lab, order in variants:
            fmt, used, cap = plan(freq, D, Fh, budget, hot, cold, order=order)
            q = copy.deepcopy(model)
            fake_quantise(q, fmt)
            hot_keys = [k for k, v in fmt.items() if hot is not None and v == hot]
            rows.append({"scheme": lab, "budget": f"{budget[0]}/{budget[1]}", "bytes": used, "budget_bytes": cap,
                         "bytes_vs_budget": used / cap, "int8_experts": len(hot_keys), "experts": len(fmt),
                         "int8_traffic_share": float(sum(share[k] for k in hot_keys)),
                         **score(model, q, x_BS, y_BS, prompts_BS, ref_gen, n_gen)})
            print(f"  {name}: {lab}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in rows[-1].items() if k != "scheme"), flush=True)
    return {"model": name, "D": D, "F": Fh, "layers": int(freq.shape[0]), "experts_per_layer": int(freq.shape[1]),
            "calibration_tokens": int(calib_BS.numel()), "frequency_share_max": float(share.max()),
            "frequency_share_min": float(share.min()), "rows": rows}


def tiny_model(steps: int, seq: int, windows: int, balance_coef: float | None = None):
    """bench/quant_quality.py's tiny model, plus calibration windows from the training split
    (`balance_coef`: the load-balancing loss weight instead of the preset's; 0 lets routing skew)."""
    run = get_preset("tiny")
    run.train.device, run.train.max_steps, run.train.eval_interval = "cpu", steps, steps
    if balance_coef is not None:
        run.model.moe.balance_coef = balance_coef
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(run, out_dir=tmp, progress=False, plots=False)
        trainer.fit(resume=False)
    x, y = trainer.corpus.batch("val", 0, windows, seq, seed=1234)  # the windows quant_quality scores
    calib, _ = trainer.corpus.batch("train", 0, windows, seq, seed=99)
    return trainer.model.eval().cpu(), calib, x, y


def hf_mixtral(seq: int, windows: int, seed: int):
    """bench/quant_quality.py's random HF Mixtral (the same config; seed 0 is its very model) with weights
    drawn from `seed`; random token windows (a random model has no text)."""
    import transformers
    from moe_runtime.core.hf import load_hf
    if seed == 0:
        return qq.hf_mixtral(seq, windows)
    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.02,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _, _ = load_hf(tmp, dtype=torch.float32)
    toks = torch.randint(0, cfg.vocab_size, (windows, seq + 1), generator=torch.Generator().manual_seed(7))
    return model.eval(), toks[:, :-1], toks[:, 1:], cfg


def verdict(res: dict) -> dict:
    """Per budget: does the frequency-chosen mixed scheme beat the uniform one on both models?"""
    out = {}
    for label, budget, hot, _ in SCHEMES:
        if hot is None:
            continue
        per = []
        for m in res["models"]:
            if not m.get("in_verdict", True):
                continue
            r = {x["scheme"]: x for x in m["rows"]}
            u = r[f"uniform int4/{budget[1]}"]
            mx = r[label]
            per.append({"model": m["model"], "kl_mixed": mx["kl"], "kl_uniform": u["kl"],
                        "top1_mixed": mx["top1_agreement"], "top1_uniform": u["top1_agreement"],
                        "kl_lower": mx["kl"] < u["kl"]})
        top1 = sum(p["top1_mixed"] - p["top1_uniform"] for p in per) / len(per)
        out[label] = {"beats": all(p["kl_mixed"] < p["kl_uniform"] for p in per) and top1 >= 0,
                      "mean_top1_gain": top1, "per_model": per}
    return out


def markdown(res: dict) -> str:
    lines = [f"# Mixed int8 / int4 experts vs uniform int4 at equal bytes ({res['date']})", "",
             f"Measured on {res['machine']}, torch {res['torch']}, load average {res['load']}. Fake quantisation "
             "(each expert dequantised from its format, what the cache computes with); bytes exact "
             "(kernels/quant.expert_bytes). Hot experts ranked by tokens routed on calibration windows "
             "(training split for the tiny model, other random tokens for the random Mixtral), never the scored ones. "
             "Verdict rule (fixed after a 20-step smoke run, before this one): mixed beats uniform if its KL is lower "
             "on every model and its top-1 agreement is not lower on average over the models. `random-hot` rows: the same number of int8 experts chosen at random.", ""]
    for label, v in res["verdict"].items():
        lines.append(f"- **{label}**: {'beats' if v['beats'] else 'does not beat'} uniform int4 at equal bytes: "
                     f"KL lower on {sum(p['kl_lower'] for p in v['per_model'])} of {len(v['per_model'])} models, "
                     f"top-1 agreement {v['mean_top1_gain']:+.4f} on average ("
                     + "; ".join(f"{p['model']}: KL {p['kl_mixed']:.3e} vs {p['kl_uniform']:.3e}, top-1 "
                                     f"{p['top1_mixed']:.4f} vs {p['top1_uniform']:.4f}" for p in v["per_model"]) + ")")
    hot = [r["int8_traffic_share"] for m in res["models"] if m.get("in_verdict", True) for r in m["rows"]
           if r["scheme"].startswith("mixed")
           and "int4/128 @ int4/32" in r["scheme"]]
    if not any(v["beats"] for v in res["verdict"].values()):
        lines += ["", "**Verdict: the mixed scheme is not shipped** (no `--expert-dtype mixed`): at equal bytes it does not "
                  "beat uniform int4 under the rule above. Why: routing is balanced (the load-balancing loss of the "
                  "trained model; random routers), so the int8 experts that fit the budget (~20% of them at the int4/32 "
                  f"budget) carry only {min(hot):.0%}-{max(hot):.0%} of the routed tokens, while the other ~80% "
                  "move to a coarser int4 group and lose more than the hot ones gain."]
    for m in (m for m in res["models"] if not m.get("in_verdict", True)):
        r = {x["scheme"]: x for x in m["rows"]}
        cmp = [f"{lab}: KL {r[lab]['kl']:.3e} vs {r[f'uniform int4/{b[1]}']['kl']:.3e} "
               f"({'lower' if r[lab]['kl'] < r[f'uniform int4/{b[1]}']['kl'] else 'not lower'}; int8 experts carry "
               f"{r[lab]['int8_traffic_share']:.0%} of tokens)" for lab, b, hot_fmt, _ in SCHEMES if hot_fmt is not None]
        lines += ["", f"With skewed routing ({m['model']}, busiest expert {m['frequency_share_max']:.1%} of routed "
                  "tokens; outside the verdict): " + "; ".join(cmp) + "."]
    for m in res["models"]:
        if not m.get("in_verdict", True):
            lines += ["", "Outside the verdict (added after it was set): a tiny model trained without the "
                      "load-balancing loss, whose routing is skewed, to see whether skew changes the answer."]
        lines += ["", f"## {m['model']} (D={m['D']}, F={m['F']}, {m['layers']} MoE layers x {m['experts_per_layer']} "
                  f"experts; calibration {m['calibration_tokens']} tokens; busiest expert {m['frequency_share_max']:.1%} "
                  f"of routed tokens, idlest {m['frequency_share_min']:.1%})", "",
                  "| scheme | bytes / budget | int8 experts | their traffic share | mean NLL | NLL increase | KL(float‖q) "
                  "| top-1 agreement | greedy agreement |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            lines.append(f"| {r['scheme']} | {r['bytes_vs_budget']:.4f} | {r['int8_experts']} of {r['experts']} | "
                         f"{r['int8_traffic_share']:.1%} | {r['mean_nll']:.4f} | {r['nll_increase_pct']:+.3f}% | "
                         f"{r['kl']:.3e} | {r['top1_agreement']:.4f} | {r['greedy_agreement']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny model (as quant_quality)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per window")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows scored (and calibration windows)")
    ap.add_argument("--gen", type=int, default=64, help="free-running greedy tokens per prompt (8 prompts)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-hot control")
    ap.add_argument("--hf-seeds", type=int, default=3, help="random HF Mixtrals scored (weight seeds 0..N-1)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    ap.add_argument("--unbalanced", action=argparse.BooleanOptionalAction, default=True,
                    help="also score a tiny model trained without the load-balancing loss (skewed routing; "
                         "reported beside the verdict, not in it)")
    ap.add_argument("--render", action="store_true", help="rewrite quant_mixed.md from --out's quant_mixed.json only")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads((Path(args.out) / "quant_mixed.json").read_text())
        res["verdict"] = verdict(res)
        (Path(args.out) / "quant_mixed.md").write_text(markdown(res))
        return 0
    torch.set_num_threads(1)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    tiny, calib, x, y = tiny_model(args.steps, args.seq, args.windows)
    models = [study(f"tiny ({args.steps} steps)", tiny, calib, x, y, x[:8, :16], args.gen, args.seed)]
    if args.unbalanced:  # an extra observation, outside the verdict (its rule names the models above)
        ub, ucal, ux, uy = tiny_model(args.steps, args.seq, args.windows, balance_coef=0.0)
        models.append({**study(f"tiny, no balance loss ({args.steps} steps)", ub, ucal, ux, uy, ux[:8, :16], args.gen,
                               args.seed), "in_verdict": False})
    for s in range(args.hf_seeds):
        hf, hx, hy, hcfg = hf_mixtral(args.seq, args.windows, s)
        hcal = torch.randint(0, hcfg.vocab_size, (args.windows, args.seq), generator=torch.Generator().manual_seed(99))
        models.append(study(f"random HF Mixtral seed {s}", hf, hcal, hx, hy, hx[:8, :16], args.gen, args.seed))
    res = {"date": utc_now(), "machine": f"{cpu_model()} (1 torch thread, shared)", "torch": torch.__version__,
           "load": load, "args": vars(args), "models": models}
    res["verdict"] = verdict(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_mixed.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "quant_mixed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
