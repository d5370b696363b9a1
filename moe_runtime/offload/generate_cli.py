"""`moe generate`: text from a checkpoint with the expert cache.

    moe generate --checkpoint runs/tiny --gpu-expert-slots 8 --prompt "def "        # policy default
    moe generate --checkpoint runs/tiny --gpu-expert-slots 8 --profile runs/tiny.trace --calibration-tokens 16
    moe generate --checkpoint runs/tiny --gpu-expert-slots 8 --policy predictive --prompt "def "
    moe generate --checkpoint runs/tiny --gpu-expert-gib 0.01 --policy lru --cpu-experts --json runs/tiny/report.json
    moe generate --hf path/to/mixtral-dir --gpu-expert-gib 20 --prompt "The capital of France is"
    moe generate --hf path/to/qwen-dir --gpu-expert-gib 8 --chat "Name three rivers." --temperature 0.7 \
        --top-p 0.9 --repetition-penalty 1.1 --stop $'\n\n' --stream
    moe generate --checkpoint runs/tiny --gpu-expert-slots 8 --prompt "def " --prompt "class Foo:"
    moe generate --checkpoint runs/tiny --expert-dtype int4 --gpu-expert-slots 8    # quantised on load

Prompts are bytes for byte-level models (vocab 256), text through the checkpoint's tokenizer.json
for --hf directories that ship one; otherwise --prompt-ids. Several --prompt run as one
left-padded batch. --chat renders the checkpoint's chat template (tokenizer_config.json et al.,
core/hf/chat.py) around the message; generation stops at the checkpoint's EOS ids (unless
--ignore-eos), --stop strings or --max-new-tokens, per sequence.
Prints the text (bytes decoded as UTF-8, errors replaced; --stream prints it as it is drawn), then
tokens/s, hit rate, bytes moved, stall time and prefetch precision/recall; --json writes the report.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moe_runtime.offload.config import (CPU_EXPERTS_CHOICES, DEFAULT_CALIBRATION_TOKENS, ENGINE_POLICIES, OffloadConfig,
                                        add_cpu_experts_arg, add_expert_dtype_arg)


def register(sub) -> None:
    """`moe generate` (entry point in the `moe_runtime.commands` group, see core/cli.py)."""
    p = sub.add_parser("generate", help="generate text with the expert cache (experts in host memory)",
                       description="Generate from a checkpoint with experts held in host memory and a fixed "
                                   "pool of device expert slots.")
    add_generate_args(p)
    p.set_defaults(func=run_generate)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory (newest checkpoint) or a step_NNNNNNNN dir")
    src.add_argument("--hf", metavar="DIR", help="local Hugging Face MoE checkpoint directory (Mixtral, Qwen2-MoE, "
                                                 "OLMoE, Qwen3-MoE, gpt-oss); experts stream into host memory")
    add_tokenizer_arg(p)
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="with --hf: rotary table size (default max_position_embeddings); a sliding-window model "
                        "loads when N <= its window")
    p.add_argument("--ignore-config-field", action="append", default=[], metavar="KEY",
                   help="with --hf: a config.json field you vouch does not change the model's math (repeatable)")
    cap = p.add_mutually_exclusive_group(required=True)
    cap.add_argument("--gpu-expert-slots", type=int, help="device expert slots (experts held at once)")
    cap.add_argument("--gpu-expert-gib", type=float, help="device memory for expert slots, in GiB")
    add_policy_args(p)
    add_cpu_experts_arg(p)
    add_expert_dtype_arg(p)
    p.add_argument("--predictor", default="auto", choices=["auto", "none", "lookahead", "exact"],
                   help="auto: exact for pre-attention-routed models, else lookahead (predictive policy only)")
    p.add_argument("--learned-from", default=None, metavar="TRACE",
                   help="train the learned predictor on this routing trace and use it")
    p.add_argument("--lookahead-depth", type=int, default=1, help="predict this many MoE layers past the next")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (bytes for byte-level models); repeat for a batch of prompts (default 'def ')")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids (models with vocab != 256)")
    p.add_argument("--chat", default=None, metavar="MESSAGE",
                   help="a user message, rendered with the checkpoint's chat template (--hf)")
    p.add_argument("--system", default=None, help="a system message before --chat")
    p.add_argument("--batch", type=int, default=1, help="copies of each prompt generated at once")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sequence (at most)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep tokens up to this probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the checkpoint's EOS ids")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (one sequence)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sequence b uses seed + b)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--trace-out", default=None, metavar="PATH", help="record the routing trace (msgpack)")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """--policy, --calibration-tokens, --profile (moe generate and moe serve)."""
    p.add_argument("--policy", choices=ENGINE_POLICIES, default="default",
                   help="default: the plan chosen per run, as `moe trace simulate` projects it (the adaptive planner "
                        "for a calibration window, then the fastest of it, the host-using peers, LRU and LFU replayed "
                        "on that window); or one fixed scheme")
    p.add_argument("--calibration-tokens", type=int, default=None, metavar="K",
                   help="--policy default: decode steps in the calibration window (>= 2; default half of this run's "
                        f"decode steps, or {DEFAULT_CALIBRATION_TOKENS} when the length is unknown)")
    p.add_argument("--profile", default=None, metavar="TRACE",
                   help="a routing trace of this model (moe trace record / --trace-out): the hot-set profile, and "
                        "with --policy default the plan is chosen on it up front (no calibration window)")


def policy_settings(args: argparse.Namespace) -> dict:
    """OffloadConfig keywords from add_policy_args' flags (the profile trace loaded, sealed)."""
    from moe_runtime.offload.trace import RoutingTrace
    profile = getattr(args, "profile", None)
    return {"policy": getattr(args, "policy", "default"), "calibration_tokens": getattr(args, "calibration_tokens", None),
            "profile": RoutingTrace.load(profile) if profile else None}


def add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    """--tokenizer (moe generate and moe serve)."""
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="with --checkpoint: the tokenizer.json of a model trained with `moe train --tokenizer` "
                        "(default: the one in its run directory, sha256-checked)")


def load_for_cache(args: argparse.Namespace, **hf_kw):
    """(model, run config, tokenizer or None, store or None) from --checkpoint [--tokenizer] or --hf
    (quantised on load per --expert-dtype); hf_kw go to load_hf_for_cache (moe generate and moe serve)."""
    if args.hf and getattr(args, "tokenizer", None):
        raise ValueError("--tokenizer goes with --checkpoint; a --hf directory uses its own tokenizer.json")
    if args.hf:
        from moe_runtime.offload.hf import load_hf_for_cache
        return load_hf_for_cache(args.hf, expert_dtype=args.expert_dtype, group=args.expert_group, **hf_kw)
    from moe_runtime.core.tokenizer import checkpoint_tokenizer
    model, run, store, ck_dir = load_checkpoint_for_cache(args.checkpoint, args.expert_dtype)
    return model, run, checkpoint_tokenizer(run, ck_dir, getattr(args, "tokenizer", None)), store


def expert_settings(args: argparse.Namespace, store) -> dict:
    """OffloadConfig keywords for the expert format: a `moe quantize` store's own, else --expert-dtype."""
    return {"expert_dtype": store.layout.expert_dtype if store is not None else args.expert_dtype,
            "expert_group": args.expert_group}


def load_checkpoint_for_cache(path, expert_dtype: str):
    """(model, run config, store or None, checkpoint dir) of one of our checkpoints: a `moe quantize`
    checkpoint loads its quantised experts into the store as they are; a float one leaves quantising (if
    asked) to the engine."""
    from moe_runtime.core.modelio import is_uri, resolve_checkpoint
    from moe_runtime.core.train import load_model
    from moe_runtime.offload.quantize_cli import load_quantized, quantized_format
    have = None if is_uri(path) else quantized_format(path)
    if have is None:
        model, run, ck = load_model(path, device="cpu")
        return model, run, None, ck.path
    if expert_dtype not in ("bf16", have[0]):
        raise ValueError(f"{path} holds {have[0]} experts (written by `moe quantize`); drop --expert-dtype "
                         f"{expert_dtype} or quantise the original checkpoint to {expert_dtype}")
    model, run, store = load_quantized(path, pin=torch.cuda.is_available())
    return model, run, store, Path(resolve_checkpoint(path))


def prompt_lists(args: argparse.Namespace, vocab_size: int, tokenizer=None, chat=None) -> list[list[int]]:
    """Token ids of every prompt (each repeated --batch times). Also serves `moe trace record`,
    whose arguments have one --prompt and no --chat."""
    chat_msg, system = getattr(args, "chat", None), getattr(args, "system", None)
    if chat_msg is not None:
        if chat is None or tokenizer is None:
            raise ValueError("--chat needs a --hf checkpoint with tokenizer.json and a chat template")
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": chat_msg}]
        prompts = [tokenizer.encode(chat.render(messages, add_generation_prompt=True), add_special_tokens=False).ids]
    elif args.prompt_ids is not None:
        try:
            prompts = [[int(t) for t in args.prompt_ids.split(",") if t.strip()]]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers") from None
    else:
        texts = [args.prompt] if isinstance(args.prompt, str) else (args.prompt or ["def "])
        if tokenizer is not None:
            prompts = [tokenizer.encode(t).ids for t in texts]
        elif vocab_size != 256:
            raise ValueError(f"this model has vocab_size={vocab_size}, not a byte-level model; pass --prompt-ids")
        else:
            prompts = [list(t.encode("utf-8")) for t in texts]
    for ids in prompts:
        if not ids:
            raise ValueError("a prompt is empty; give --prompt TEXT or --prompt-ids")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside [0, {vocab_size})")
    return [ids for ids in prompts for _ in range(args.batch)]


def prompt_tensor(args: argparse.Namespace, vocab_size: int, tokenizer=None) -> torch.Tensor:
    """[B, S] for prompts of one length (the old single-prompt interface)."""
    prompts = prompt_lists(args, vocab_size, tokenizer)
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts of different lengths do not make one tensor; use prompt_lists")
    return torch.tensor(prompts, dtype=torch.long)


def sampling_params(args: argparse.Namespace, eos_ids: tuple[int, ...], n: int) -> list:
    from moe_runtime.core.generation import SamplingParams
    return [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                           seed=args.seed + b if args.temperature > 0 else None, eos_token_ids=eos_ids,
                           stop=tuple(args.stop), ignore_eos=args.ignore_eos) for b in range(n)]


def decode(ids: list[int], vocab_size: int, tokenizer=None) -> str:
    if tokenizer is not None:
        return tokenizer.decode(ids)
    if vocab_size == 256:
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(str(i) for i in ids)


def run_generate(args: argparse.Namespace) -> int:
    """1. load (dense part + host expert store), 2. prompts and sampling settings, 3. the engine,
    4. generate (or stream), 5. print the text and the report."""
    from moe_runtime.offload.engine import ExpertCacheEngine
    from moe_runtime.offload.predictor import LearnedPredictor
    from moe_runtime.offload.report import summary_lines
    from moe_runtime.offload.trace import RoutingTrace

    for name in ("batch", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    model, run, tokenizer, store = load_for_cache(args, max_seq_len=args.max_seq_len,
                                                  ignore_config_fields=tuple(args.ignore_config_field))
    chat = None
    if args.hf:
        from moe_runtime.core.hf.chat import load_chat
        chat = load_chat(args.hf, tokenizer)
    V = model.cfg.vocab_size
    prompts = prompt_lists(args, V, tokenizer, chat)
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({longest}) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's "
                         f"max_seq_len={model.cfg.max_seq_len}; shorten one of them")
    params = sampling_params(args, chat.eos_token_ids if chat is not None else (), len(prompts))
    predictor = args.predictor
    if args.learned_from:
        predictor = LearnedPredictor.fit(RoutingTrace.load(args.learned_from), args.lookahead_depth)
    config = OffloadConfig(gpu_expert_slots=args.gpu_expert_slots, gpu_expert_gib=args.gpu_expert_gib,
                           cpu_experts=CPU_EXPERTS_CHOICES[args.cpu_experts], device=args.device,
                           predictor=predictor, lookahead_depth=args.lookahead_depth, record_trace=args.trace_out is not None,
                           **expert_settings(args, store), **policy_settings(args))
    engine = ExpertCacheEngine(model, config, store=store)
    text_of = lambda ids: decode(ids, V, tokenizer)  # noqa: E731
    if args.stream:
        if len(prompts) != 1:
            raise ValueError("--stream prints one sequence; drop --batch / extra --prompt")
        for ev in engine.stream(prompts, params, decode=text_of):
            print(ev.text, end="", flush=True)
        print()
        res = None
    else:
        res = engine.generate(prompts, params=params, decode=text_of)
        for b, seq in enumerate(res.sequences):
            if isinstance(seq.stop_reason, str):  # a stop string: the text ends before it
                text = text_of(prompts[b]) + seq.text
            else:  # decoded together, so tokenizers that join words with spaces print them right
                text = text_of(prompts[b] + seq.tokens[:-1 if seq.finish_reason == "stop" else None])
            print(text if len(prompts) == 1 else f"[{b}] {text}")
    report = engine.report()
    print("---")
    for line in summary_lines(report):
        print(line)
    if res is not None:
        report = {**report, "tokens": [s.tokens for s in res.sequences],
                  "finish_reasons": [s.finish_reason for s in res.sequences]}
    report = {**report, "checkpoint": str(args.checkpoint or args.hf), "run": run.name}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.trace_out:
        path = engine.trace().save(args.trace_out)
        print(f"routing trace: {path} ({len(engine.trace())} records)")
    return 0


__all__ = ["register", "add_generate_args", "add_policy_args", "policy_settings", "run_generate",
           "add_tokenizer_arg", "load_for_cache", "expert_settings", "load_checkpoint_for_cache", "prompt_lists", "prompt_tensor", "sampling_params", "decode"]
