"""The `moe` command (also `python -m moe_runtime`).

    moe train                                      tiny preset, default corpus, about a minute on 2 CPU cores
    moe train --preset small --data my.txt         another preset, your text
    moe train --workers 2 --ep 2 --name tiny-ep2   2 Ray Train workers (1 core each), expert parallel
    moe train --workers 4 --ep 2 --cpus-per-worker 0.5 --name tiny-ep2x2   4 workers on a 2-core machine
    moe eval runs/tiny                             validation loss / perplexity of the newest checkpoint
    moe generate --checkpoint runs/tiny --gpu-expert-slots 8 --policy predictive
    moe trace simulate runs/tiny/trace.msgpack     replay a routing trace through every cache policy
    moe serve --checkpoint runs/tiny --gpu-expert-slots 8   OpenAI-compatible HTTP server on 127.0.0.1:8000
    moe presets                                    list the named presets
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import signal
import sys
from pathlib import Path

from moe_runtime.core.config import PRESETS, ConfigError, RunConfig, get_preset, load_config, param_count, tomllib


def register_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (single process, or Ray workers with --workers)",
                       description="Train an MoE language model. With no arguments: the tiny preset on the "
                                   "Python standard library's source, on CPU, in about a minute on 2 cores. "
                                   "Options without a default shown take the preset's or config file's value. "
                                   "A rerun in the same run directory resumes from its newest valid checkpoint.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named preset (default: tiny)")
    src.add_argument("--config", default=None, help="TOML or JSON config with [model], [model.moe], [train]")
    p.add_argument("--data", default=None, help="text file, directory of text files, or .bin uint16 token file "
                                                "(default: the Python standard library's .py files)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json (e.g. a byte-level BPE from core/tokenizer.py): --data text is encoded with "
                        "it, vocab_size becomes its vocabulary, and it is copied into the run directory, where "
                        "moe generate / moe serve find it (default: bytes)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--name", default=None, help="run name (default: the preset or config name)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per micro-batch, over all workers (with --workers W each trains on "
                        "batch_size / W); an optimizer step sees grad_accum x batch_size sequences")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None, help="seeds initialisation and batch sampling")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (0 = default)")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between validation runs (and at the end)")
    p.add_argument("--ckpt-interval", type=int, default=None,
                   help="steps between checkpoints (and at the end); 0: only at the end")
    p.add_argument("--balance-scope", choices=["micro_batch", "global_batch"], default=None,
                   help="where the load-balancing loss takes its expert frequencies from")
    p.add_argument("--global-sync", choices=["exact", "cumulative"], default=None,
                   help="global-batch semantics over accumulation micro-batches (see core/router.py)")
    p.add_argument("--balance-coef", type=float, default=None, help="load-balancing loss weight (0 = off)")
    p.add_argument("--aux-free-bias", action="store_true", help="DeepSeek-V3 aux-loss-free bias balancing")
    p.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default=None,
                   help="recompute blocks (full) or attention only (selective) in backward to save activations")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    p.set_defaults(func=cmd_train)


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """Preset or config file, then command-line overrides, validated again."""
    run = load_config(args.config) if args.config else get_preset(args.preset or "tiny")
    t, m = run.train, run.model.moe
    for flag, attr in (("max_steps", "max_steps"), ("batch_size", "batch_size"), ("seq_len", "seq_len"),
                       ("grad_accum", "grad_accum"), ("lr", "lr"), ("seed", "seed"), ("device", "device"),
                       ("threads", "threads"), ("eval_interval", "eval_interval"),
                       ("activation_checkpointing", "activation_checkpointing"),
                       ("ckpt_interval", "ckpt_interval")):
        v = getattr(args, flag)
        if v is not None:
            setattr(t, attr, v)
    for flag in ("balance_scope", "global_sync", "balance_coef"):
        v = getattr(args, flag)
        if v is not None:
            setattr(m, flag, v)
    if args.aux_free_bias:
        m.aux_free_bias = True
    if t.eval_interval > t.max_steps:
        t.eval_interval = t.max_steps
    if args.name:
        run.name = args.name
    # Re-run validation on the overridden values; an error names the flag that set the value.
    try:
        return RunConfig.from_dict(run.to_dict(), source=args.config or f"preset {args.preset or 'tiny'}")
    except ValueError as e:
        flags = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v not in (None, False) and f"{k}=" in str(e)]
        raise ConfigError(f"{e}" + (f" (set by {', '.join(flags)})" if flags else "")) from None


def cmd_train(args: argparse.Namespace) -> int:
    run = build_run_config(args)
    out = Path(args.out) if args.out else Path("runs") / run.name
    corpus = None
    if getattr(args, "tokenizer", None):
        if getattr(args, "workers", 0):
            raise ConfigError("--tokenizer is single-process only; with --workers pass --data a token file (.bin)")
        from moe_runtime.core.tokenizer import tokenizer_training_corpus
        corpus = tokenizer_training_corpus(run, args.tokenizer, args.data, out)
    if getattr(args, "workers", 0):  # the options moe_runtime.cluster adds to this command (cluster/cli.py)
        return args.run_workers(run, args)
    from moe_runtime.core.device import resolve_device
    from moe_runtime.core.footprint import check_fits
    check_fits(run, resolve_device(run.train.device))  # before the size is printed or anything is built
    counts = param_count(run.model)
    print(f"[moe] {run.name}: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per "
          f"token; {run.model.moe.num_experts} experts top-{run.model.moe.top_k}; balance "
          f"{run.model.moe.balance_scope} coef {run.model.moe.balance_coef}; run dir {out}", flush=True)
    trainer = None
    try:
        from moe_runtime.core.train import Trainer
        trainer = Trainer(run, out_dir=out, data=args.data, corpus=corpus, progress=not args.no_progress)
        print(f"[moe] data: {trainer.corpus.source}; unigram baseline "
              f"{trainer.corpus.unigram_entropy():.4f} nats/token", flush=True)
        summary = trainer.fit(resume=not args.no_resume)
    except KeyboardInterrupt:
        print(_interrupted_line(out, trainer.step if trainer is not None else None), file=sys.stderr, flush=True)
        return 130
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), e.filename or f"the run directory {out}") from None
    ev = summary.get("last_eval") or {}
    if ev:
        print(f"[moe] done at step {summary['step']}: val_loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}); "
              f"checkpoints in {out / 'checkpoints'}, metrics in {out / 'metrics.jsonl'}, "
              f"expert-load heatmap {out / 'plots' / 'expert_load_latest.png'}")
    return 0


def _interrupted_line(out: Path, step: int | None) -> str:
    """Ctrl-C / SIGTERM during `moe train`: where it stopped and what a rerun resumes from."""
    from moe_runtime.core.checkpoint import list_checkpoints
    done = list_checkpoints(out / "checkpoints")
    where = f"at step {step}" if step is not None else "during training"
    resume = (f"rerun the same command to resume from {done[-1]}" if done else
              "no checkpoint was written yet, so a rerun starts from step 0")
    return f"moe train: interrupted {where}; {resume}"


def register_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a run's newest checkpoint",
                       description="Evaluate the newest valid checkpoint of RUN_DIR (or a checkpoint directory).")
    p.add_argument("run_dir", help="run directory written by `moe train`, or a checkpoints/step_* directory")
    p.add_argument("--data", default=None, help="evaluate on this data instead of the default corpus")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", default=None, help="also write the result as JSON to this path")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from moe_runtime.core.train import Trainer
    overrides = {"device": args.device}
    if args.batches:
        overrides["eval_batches"] = args.batches
    trainer = Trainer.from_checkpoint(args.run_dir, train_overrides=overrides, data=args.data, progress=False,
                                      plots=False)
    res = trainer.evaluate()
    res["unigram_baseline"] = trainer.corpus.unigram_entropy()
    res["data"] = trainer.corpus.source
    print(f"step {res['step']}: val_loss {res['val_loss']:.4f} nats/token, perplexity {res['val_ppl']:.3f} "
          f"(unigram baseline {res['unigram_baseline']:.4f} nats, ppl {math.exp(res['unigram_baseline']):.2f}); "
          f"expert load max/mean {res.get('load_max_over_mean', float('nan')):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def register_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the named presets", description="List presets and their sizes.")
    p.set_defaults(func=cmd_presets)


def cmd_presets(args: argparse.Namespace) -> int:
    for name in PRESETS:
        r = get_preset(name)
        c = param_count(r.model)
        m = r.model.moe
        print(f"{name:15s} {c['total'] / 1e6:10.1f}M params {c['active'] / 1e6:9.1f}M active  "
              f"L={r.model.n_layers} D={r.model.d_model} E={m.num_experts} K={m.top_k} F={m.d_expert}")
    return 0


# Every subcommand is a `register(subparsers)` named by an entry point in the `moe_runtime.commands`
# group; `moe_runtime.command_options` entries add options to a command another package registered
# (moe_runtime.cluster adds --workers & co. to `train`). So this module imports nothing from
# moe_runtime.cluster or moe_runtime.offload. A source checkout run without installing (PYTHONPATH)
# has no metadata: then the same tables are read from the checkout's pyproject.toml.
COMMANDS_GROUP = "moe_runtime.commands"
OPTIONS_GROUP = "moe_runtime.command_options"
ORDER = ("train", "eval", "generate", "trace", "serve", "presets")
"""Help order; a command not listed here comes after these, by name."""


def declared_entry_points(group: str) -> dict[str, str]:
    """name -> "module:attr" of an entry-point group: installed metadata, else the checkout's pyproject.toml."""
    from importlib.metadata import entry_points
    found = {ep.name: ep.value for ep in entry_points(group=group)}
    if found:
        return found
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    with open(pyproject, "rb") as f:
        table = tomllib.load(f).get("project", {}).get("entry-points", {}).get(group, {})
    return dict(table)


def _load(target: str):
    """The callable an entry point names, or None when the module it names is not there (a stale entry
    point of a package that was removed): the other commands still work. Any other import error is raised."""
    from importlib import import_module
    module, _, attr = target.partition(":")
    try:
        return getattr(import_module(module), attr)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        return None


def _add_commands(sub) -> None:
    commands = declared_entry_points(COMMANDS_GROUP)
    if not commands:
        raise RuntimeError("moe-runtime's commands are not registered: install the package "
                           "(`pip install -e .` in the checkout, or `bash scripts/install.sh`)")
    rank = {name: i for i, name in enumerate(ORDER)}
    for name in sorted(commands, key=lambda n: (rank.get(n, len(ORDER)), n)):
        register = _load(commands[name])
        if register is not None:
            register(sub)
    for name, target in sorted(declared_entry_points(OPTIONS_GROUP).items()):
        command = sub.choices.get(name)
        add_options = _load(target) if command is not None else None
        if add_options is not None:
            add_options(command)


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it has none (None, False, []) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS \
                or "default" in text or not action.option_strings:
            return text
        shown = "(default: %(default)r)" if isinstance(default, str) else "(default: %(default)s)"
        return f"{text} {shown}" if text else shown


class RawDescriptionDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """A description whose line breaks are kept (lists), and option defaults shown."""


class CommandParser(argparse.ArgumentParser):
    """The parser of `moe` and of every subcommand (add_parser makes its children of this class):
    no abbreviations (`--max-step` is a typo, not `--max-steps`); an unknown option is reported by
    the (sub)command it was given to, before any other error, with the options it resembles; a
    usage longer than a few lines is shortened to one (`--help` has the rest)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    subcommand = False
    """Set on every parser below `moe` (build_parser): leftover words are its error, not the top level's."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        unknown = self._unknown_options(args)
        if unknown:
            hints = [f"{u} (did you mean {' or '.join(near)}?)" if near else u
                     for u in unknown for near in [self._nearest(u)]]
            self.error(f"unrecognized arguments: {', '.join(hints)}")
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self.subcommand:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _unknown_options(self, args: list[str]) -> list[str]:
        """Option-like words (argparse's own rule: a leading '-', no space, not a negative number)
        that name no option of this parser, up to '--' or the word that picks a subcommand."""
        subcommands = {name for a in self._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}
        unknown = []
        for word in args:
            if word == "--" or word in subcommands:
                break
            if not word.startswith("-") or word == "-" or " " in word or re.fullmatch(r"-\d+|-\d*\.\d+", word):
                continue
            name = word.split("=", 1)[0] if word.startswith("--") else word
            if name not in self._option_string_actions:
                unknown.append(name)
        return unknown

    def _nearest(self, name: str) -> list[str]:
        options = sorted(o for o in self._option_string_actions if o.startswith("--"))
        stem = name.lstrip("-")
        near = [o for o in options if stem and stem in o] if len(stem) >= 3 else []
        return (near or difflib.get_close_matches(name, options, n=2, cutoff=0.6))[:3]

    def format_usage(self) -> str:
        usage = super().format_usage()
        if usage.count("\n") <= 4:
            return usage
        positionals = [f"{a.metavar} ..." if isinstance(a, argparse._SubParsersAction) else (a.metavar or a.dest)
                       for a in self._actions if not a.option_strings]
        return f"usage: {' '.join([self.prog, '[options]', *positionals])}  ('{self.prog} --help' lists the options)\n"

    def error(self, message: str):
        self.exit(2, f"{self.format_usage()}{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="moe", description=__doc__, formatter_class=RawDescriptionDefaultsFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_commands(sub)
    below = [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    while below:
        p = below.pop()
        p.subcommand = True
        below += [q for a in p._actions if isinstance(a, argparse._SubParsersAction) for q in a.choices.values()]
    return parser


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: one line, checkpoints intact


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:  # name the path: read-only, disk full, missing
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Input, config, file and I/O errors print one line on stderr and exit 2
    (no traceback); a missing optional dependency exits 3; Ctrl-C / SIGTERM exit 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        print(f"moe {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"moe {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"moe {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
