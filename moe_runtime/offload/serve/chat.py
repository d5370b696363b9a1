"""Chat prompts and EOS ids for `moe serve`: core.hf.chat (the checkpoint's template, rendered as
transformers renders it) found next to the checkpoint, and a plain default where there is none.

Where: an --hf directory itself; for --checkpoint, the run directory (or, given a step_* dir, that
dir, then its run directory) - the first that holds one of CHAT_FILES. A checkpoint without a
template (our byte-level runs) gets DEFAULT_TEMPLATE: "<|role|>\\ncontent\\n" per message and
"<|assistant|>\\n" to answer after.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from moe_runtime.core.hf.chat import ChatTemplate, load_chat

CHAT_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "generation_config.json",
              "special_tokens_map.json")
DEFAULT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def chat_dir(source: Path) -> Path:
    source = source.resolve()
    dirs = [source] + ([source.parent, source.parent.parent] if source.name.startswith("step_") else [])
    return next((d for d in dirs if any((d / f).is_file() for f in CHAT_FILES)), source)


def load_server_chat(source: Path, tokenizer: Any = None) -> tuple[Callable[[list[dict]], str], tuple[int, ...]]:
    """(messages -> prompt text, EOS ids). Rendering errors (a template's raise_exception) are ValueErrors."""
    from jinja2 import TemplateError, TemplateSyntaxError

    where = chat_dir(source)
    chat = load_chat(where, tokenizer)
    if chat.template is None:
        chat = ChatTemplate(template=DEFAULT_TEMPLATE, special_tokens=chat.special_tokens,
                            eos_token_ids=chat.eos_token_ids)
    try:  # a template that does not compile is refused at start-up, not on every request
        chat.render([{"role": "user", "content": "hi"}])
    except TemplateSyntaxError as e:
        raise ValueError(f"{where}: the chat template does not compile ({e}); fix it or remove it") from None
    except TemplateError:  # the template's own checks; real requests will say what they want
        pass

    def render(messages: list[dict]) -> str:
        try:
            return chat.render(messages, add_generation_prompt=True)
        except TemplateError as e:
            raise ValueError(str(e)) from None

    return render, chat.eos_token_ids


__all__ = ["load_server_chat", "chat_dir", "DEFAULT_TEMPLATE", "CHAT_FILES"]
