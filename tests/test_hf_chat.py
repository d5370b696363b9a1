"""Chat templates (core/hf/chat.py) render exactly what transformers' apply_chat_template renders
for the same checkpoint files and messages, and `moe generate --hf DIR --chat` feeds those ids to
the expert cache and stops at the checkpoint's EOS like transformers' generate()."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from moe_runtime.core.hf.chat import load_chat

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "user", "assistant", "system",
         "hi", "there", "you", "are", "helpful", "name", "three", "rivers", "ok"]

CHATML = """{%- set ns = namespace(sys=false) -%}
{%- for m in messages -%}
{%- if m['role'] == 'system' %}{% set ns.sys = true %}{% endif -%}
{%- endfor -%}
{%- if not ns.sys %}<|im_start|>system
you are helpful<|im_end|>
{% endif -%}
{%- for m in messages -%}
{%- if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif -%}
<|im_start|>{{ m['role'] }}
{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>
{% endfor -%}
{%- if tools %}<|im_start|>system
{{ tools | tojson }}<|im_end|>
{% endif -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""

MIXTRAL = """{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}\
{{ message['content'] + eos_token }}{% endif %}{% endfor %}"""

MESSAGES = [
    [{"role": "user", "content": "hi there"}],
    [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "name three rivers"},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}],
]


def checkpoint_files(path, template: str, *, as_file: bool = False, eos_id: int | None = None) -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False,
                         "normalized": False, "single_word": False, "special": True},
           "eos_token": "</s>", "unk_token": "<unk>"}
    if as_file:
        (path / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if eos_id is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos_id]}))


@pytest.mark.parametrize("template,as_file", [(CHATML, False), (CHATML, True), (MIXTRAL, False)],
                         ids=["chatml", "chatml-jinja-file", "mixtral"])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_render_equals_apply_chat_template(tmp_path, template, as_file, gen_prompt):
    checkpoint_files(tmp_path, template, as_file=as_file)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_chat(tmp_path)
    for messages in MESSAGES if template is CHATML else MESSAGES[:1]:
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours.render(messages, add_generation_prompt=gen_prompt) == want
    tools = [{"type": "function", "function": {"name": "f", "description": "é <x>", "parameters": {}}}]
    if template is CHATML:
        assert ours.render(MESSAGES[0], tools=tools) == theirs.apply_chat_template(
            MESSAGES[0], tools=tools, tokenize=False, add_generation_prompt=True)


def test_template_errors_and_missing_template(tmp_path):
    checkpoint_files(tmp_path, MIXTRAL)
    chat = load_chat(tmp_path)
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        chat.render([{"role": "assistant", "content": "ok"}])
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat template"):
        load_chat(tmp_path).render(MESSAGES[0])
    escape = "{{ messages.__class__.__mro__ }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": escape}))
    with pytest.raises(jinja2.exceptions.SecurityError):
        load_chat(tmp_path).render(MESSAGES[0])


def test_moe_generate_chat_stops_at_the_checkpoints_eos(tmp_path, capsys):
    """The CLI: template -> ids (no extra BOS) -> expert cache at 25% -> stop at generation_config's EOS."""
    from moe_runtime.core.cli import main
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.3,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    checkpoint_files(tmp_path, CHATML)
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        MESSAGES[0], add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = torch.tensor([ids["input_ids"] if isinstance(ids, dict) else ids])
    free = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    eos = free[min(3, len(free) - 1)]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    want = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)[0, ids.shape[1]:]
    out = tmp_path / "r.json"
    assert main(["generate", "--hf", str(tmp_path), "--chat", "hi there", "--gpu-expert-slots", "2",
                 "--max-new-tokens", "10", "--device", "cpu", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["tokens"][0] == want.tolist() and rep["tokens"][0][-1] == eos and len(rep["tokens"][0]) < 10
    assert rep["finish_reasons"] == ["stop"]
    assert rep["prompt_tokens"] == ids.shape[1]
    assert main(["generate", "--hf", str(tmp_path), "--chat", "hi", "--gpu-expert-slots", "2", "--device", "cpu",
                 "--max-new-tokens", "10", "--ignore-eos", "--stream"]) == 0
    assert "hit rate" in capsys.readouterr().out
