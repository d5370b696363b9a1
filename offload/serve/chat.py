"""Chat prompts and stop tokens for `moe serve`, from the checkpoint's tokenizer_config.json.

The chat template is the checkpoint's own Jinja template (rendered in a sandbox, as transformers
renders it, with add_generation_prompt=True). A checkpoint without one (our byte-level runs) gets
DEFAULT_TEMPLATE, "<|role|>\\ncontent\\n" per message and "<|assistant|>\\n" to answer after.
Stop tokens: the eos_token_id of config.json / generation_config.json and the tokenizer's
eos_token; they end an answer and are not part of it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from offload.serve.text import TokenizerAdapter

DEFAULT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _config_dirs(source: Path) -> list[Path]:
    """Where a checkpoint's tokenizer files may be: the directory given and, for a step_* dir, its run dir."""
    source = source.resolve()
    dirs = [source]
    if source.name.startswith("step_"):
        dirs += [source.parent, source.parent.parent]
    return dirs


def _read_json(source: Path, name: str) -> dict[str, Any]:
    for d in _config_dirs(source):
        f = d / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{f}: not valid JSON ({e}); fix or remove it") from None
            if not isinstance(data, dict):
                raise ValueError(f"{f}: the top level must be a JSON object")
            return data
    return {}


def _token_text(tok: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def load_chat_template(source: Path, tok: TokenizerAdapter) -> Callable[[list[dict[str, str]]], str]:
    """messages -> prompt text, with the checkpoint's template or DEFAULT_TEMPLATE."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    cfg = _read_json(source, "tokenizer_config.json")
    template = cfg.get("chat_template") or DEFAULT_TEMPLATE
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or DEFAULT_TEMPLATE
    if not isinstance(template, str):
        raise ValueError(f"{source}: tokenizer_config.json chat_template must be a string, got "
                         f"{type(template).__name__}")

    def raise_exception(message: str):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"{source}: the chat template does not compile ({e})") from None
    specials = {k: _token_text(cfg.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def render(messages: list[dict[str, str]]) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=True, **specials)
        except TemplateError as e:
            raise ValueError(str(e)) from None

    return render


def stop_token_ids(source: Path, tok: TokenizerAdapter) -> frozenset[int]:
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        eos = _read_json(source, name).get("eos_token_id")
        ids.update(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    eos_text = _token_text(_read_json(source, "tokenizer_config.json").get("eos_token"))
    if eos_text and tok.tokenizer is not None:
        tid = tok.tokenizer.token_to_id(eos_text)
        if tid is not None:
            ids.add(tid)
    return frozenset(i for i in ids if 0 <= i < tok.vocab_size)


__all__ = ["load_chat_template", "stop_token_ids", "DEFAULT_TEMPLATE"]
