"""A checkpoint's chat template and stop ids, rendered the way transformers' apply_chat_template does.

    chat = load_chat(path)                    # chat_template.jinja / .json / tokenizer_config.json
    text = chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False).ids     # the template wrote BOS itself
    chat.eos_token_ids                        # generation_config.json, else config.json, + eos_token

Templates are code from the checkpoint, so they run in jinja2's ImmutableSandboxedEnvironment with
exactly the environment transformers builds (trim_blocks, lstrip_blocks, loopcontrols, the
{% generation %} tag, a non-escaping tojson, raise_exception, strftime_now, dict, a namespace that
refuses underscore names) and the same variables (messages, tools, documents,
add_generation_prompt, and the special tokens: bos_token, eos_token, ...), so the text is the same.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(kw_only=True)
class ChatTemplate:
    template: str | None
    """The jinja source (None: the checkpoint ships no chat template)."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    """Ids that end a reply: generation_config.json / config.json eos_token_id, and eos_token's id."""

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, documents: list[dict] | None = None, **kwargs) -> str:
        if self.template is None:
            raise ValueError("this checkpoint has no chat template (no chat_template.jinja, chat_template.json or "
                             "chat_template in tokenizer_config.json); give a plain --prompt instead")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"chat messages are dicts with 'role' and 'content'; got {m!r}")
        return _compile(self.template).render(messages=messages, tools=tools, documents=documents,
                                              add_generation_prompt=add_generation_prompt,
                                              **{**self.special_tokens, **kwargs})


def load_chat(path: str | Path, tokenizer: Any = None) -> ChatTemplate:
    """The chat template, special tokens and EOS ids of a local checkpoint directory. `tokenizer`
    (a tokenizers.Tokenizer) maps eos_token to its id."""
    p = Path(path)
    tok_cfg = _json(p / "tokenizer_config.json")
    special = _json(p / "special_tokens_map.json")
    tokens = {}
    for name in SPECIAL_TOKENS:
        v = tok_cfg.get(name, special.get(name))
        if isinstance(v, dict):  # AddedToken serialised as {"content": ...}
            v = v.get("content")
        if isinstance(v, str):
            tokens[name] = v
    eos = _eos_ids(p)
    if tokenizer is not None and "eos_token" in tokens:
        tid = tokenizer.token_to_id(tokens["eos_token"])
        if tid is not None and tid not in eos:
            eos.append(tid)
    return ChatTemplate(template=_template(p, tok_cfg), special_tokens=tokens, eos_token_ids=tuple(eos))


def _template(p: Path, tok_cfg: dict) -> str | None:
    """transformers' order: chat_template.jinja, then chat_template.json, then tokenizer_config.json."""
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text(encoding="utf-8")
    t = _json(p / "chat_template.json").get("chat_template") or tok_cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" not in named:
            raise ValueError(f"{p}: named chat templates {sorted(named)} have no 'default'")
        t = named["default"]
    return t


def _eos_ids(p: Path) -> list[int]:
    for name in ("generation_config.json", "config.json"):
        v = _json(p / name).get("eos_token_id")
        if v is not None:
            return [int(v)] if isinstance(v, int) else [int(i) for i in v]
    return []


def _json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return d


_CACHE: dict[str, Any] = {}


def _compile(source: str):
    if source not in _CACHE:
        _CACHE[source] = _environment().from_string(source)
    return _CACHE[source]


def _environment():
    """The sandbox transformers builds for chat templates (utils/chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: marks the assistant's text; renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names ({name!r})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env


__all__ = ["ChatTemplate", "load_chat", "SPECIAL_TOKENS"]
