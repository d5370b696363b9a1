"""`moe generate`: text from a checkpoint with the expert cache.

    moe generate --checkpoint runs/tiny --gpu-expert-slots 8 --policy predictive --prompt "def "
    moe generate --checkpoint runs/tiny --gpu-expert-gib 0.01 --policy lru --cpu-experts --json out.json
    moe generate --hf path/to/mixtral-dir --gpu-expert-gib 20 --prompt "The capital of France is"

Prompts are bytes for byte-level models (vocab 256), text through the checkpoint's tokenizer.json
for --hf directories that ship one; otherwise --prompt-ids.
Prints the text (bytes decoded as UTF-8, errors replaced), then tokens/s, hit rate, bytes moved,
stall time and prefetch precision/recall; --json writes the full report.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from offload.cache import POLICIES


def add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory (newest checkpoint) or a step_NNNNNNNN dir")
    src.add_argument("--hf", metavar="DIR", help="local Hugging Face MoE checkpoint directory (Mixtral, Qwen2-MoE, "
                                                 "OLMoE, Qwen3-MoE); experts stream into host memory")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="with --hf: rotary table size (default max_position_embeddings); a sliding-window model "
                        "loads when N <= its window")
    p.add_argument("--ignore-config-field", action="append", default=[], metavar="KEY",
                   help="with --hf: a config.json field you vouch does not change the model's math (repeatable)")
    cap = p.add_mutually_exclusive_group(required=True)
    cap.add_argument("--gpu-expert-slots", type=int, help="device expert slots (experts held at once)")
    cap.add_argument("--gpu-expert-gib", type=float, help="device memory for expert slots, in GiB")
    p.add_argument("--policy", choices=POLICIES, default="predictive", help="slot replacement policy")
    p.add_argument("--cpu-experts", action="store_true",
                   help="let the calibrated cost model run cold experts on host cores")
    p.add_argument("--predictor", default="auto", choices=["auto", "none", "lookahead", "exact"],
                   help="auto: exact for pre-attention-routed models, else lookahead (predictive policy only)")
    p.add_argument("--learned-from", default=None, metavar="TRACE",
                   help="train the learned predictor on this routing trace and use it")
    p.add_argument("--lookahead-depth", type=int, default=1, help="predict this many MoE layers past the next")
    p.add_argument("--prompt", default="def ", help="prompt text (bytes for byte-level models)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids (models with vocab != 256)")
    p.add_argument("--batch", type=int, default=1, help="sequences generated at once (the prompt repeated)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--trace-out", default=None, metavar="PATH", help="record the routing trace (msgpack)")


def prompt_tensor(args: argparse.Namespace, vocab_size: int, tokenizer=None) -> torch.Tensor:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers") from None
    elif tokenizer is not None:
        ids = tokenizer.encode(args.prompt).ids
    else:
        if vocab_size != 256:
            raise ValueError(f"this model has vocab_size={vocab_size}, not a byte-level model; pass --prompt-ids")
        ids = list(args.prompt.encode("utf-8"))
    if not ids:
        raise ValueError("the prompt is empty; give --prompt TEXT or --prompt-ids")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside [0, {vocab_size})")
    return torch.tensor([ids] * args.batch, dtype=torch.long)


def decode(ids: list[int], vocab_size: int, tokenizer=None) -> str:
    if tokenizer is not None:
        return tokenizer.decode(ids)
    if vocab_size == 256:
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(str(i) for i in ids)


def run_generate(args: argparse.Namespace) -> int:
    from moe.train import load_model
    from offload.engine import ExpertCacheEngine
    from offload.predictor import LearnedPredictor
    from offload.report import summary_lines
    from offload.trace import RoutingTrace

    for name in ("batch", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    tokenizer = store = None
    if args.hf:
        from offload.hf import load_hf_for_cache
        model, run, tokenizer, store = load_hf_for_cache(args.hf, max_seq_len=args.max_seq_len,
                                                         ignore_config_fields=tuple(args.ignore_config_field))
    else:
        model, run, _ = load_model(args.checkpoint, device="cpu")
    V = model.cfg.vocab_size
    prompt = prompt_tensor(args, V, tokenizer)
    if prompt.shape[1] + args.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]}) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's "
                         f"max_seq_len={model.cfg.max_seq_len}; shorten one of them")
    predictor = args.predictor
    if args.learned_from:
        predictor = LearnedPredictor.fit(RoutingTrace.load(args.learned_from), args.lookahead_depth)
    engine = ExpertCacheEngine(model, gpu_expert_slots=args.gpu_expert_slots, gpu_expert_gib=args.gpu_expert_gib,
                               policy=args.policy, cpu_experts=args.cpu_experts, device=args.device,
                               predictor=predictor, lookahead_depth=args.lookahead_depth,
                               record_trace=args.trace_out is not None, store=store)
    gen = torch.Generator(device=engine.device).manual_seed(args.seed) if args.temperature > 0 else None
    res = engine.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    for b in range(prompt.shape[0]):
        text = decode(prompt[b].tolist() + res.tokens[b].tolist(), V, tokenizer)
        print(text if prompt.shape[0] == 1 else f"[{b}] {text}")
    print("---")
    for line in summary_lines(res.report):
        print(line)
    report = {**res.report, "checkpoint": str(args.checkpoint or args.hf), "run": run.name,
              "tokens": res.tokens.tolist()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.trace_out:
        path = engine.trace().save(args.trace_out)
        print(f"routing trace: {path} ({len(engine.trace())} records)")
    return 0


__all__ = ["add_generate_args", "run_generate", "prompt_tensor", "decode"]
