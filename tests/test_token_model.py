"""A model trained on BPE tokens, end to end: `moe train --tokenizer` records the tokenizer (copy in
the run directory, sha256 in the model config), and `moe generate` / `moe serve` pick it up from the
run and decode text; a missing or different tokenizer is one clear error."""
from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("tokenizers")

from moe_runtime.core.cli import main as moe_main  # noqa: E402
from moe_runtime.core.modelio import load_model  # noqa: E402
from moe_runtime.core.tokenizer import file_sha256, load_tokenizer_file, save_tokenizer, train_bpe  # noqa: E402

TEXT = ("The expert cache keeps the hottest experts on the device. Die Experten werden geladen. "
        "Les experts sont chargés à la demande. Los expertos se cargan bajo demanda.\n") * 40
CONFIG = """name = "tok-tiny"
[model]
d_model = 32
n_layers = 2
n_heads = 4
max_seq_len = 64
[model.moe]
num_experts = 4
top_k = 2
d_expert = 32
[train]
max_steps = 2
batch_size = 2
seq_len = 32
eval_interval = 2
ckpt_interval = 2
eval_batches = 1
device = "cpu"
threads = 1
"""


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokmodel")
    tok = train_bpe([TEXT], vocab_size=320)
    sha = save_tokenizer(tok, root / "bpe.json")
    (root / "data.txt").write_text(TEXT)
    (root / "cfg.toml").write_text(CONFIG)
    run = root / "run"
    assert moe_main(["train", "--config", str(root / "cfg.toml"), "--tokenizer", str(root / "bpe.json"),
                     "--data", str(root / "data.txt"), "--out", str(run), "--no-progress"]) == 0
    return root, run, tok, sha


def test_train_records_the_tokenizer_with_the_run(token_run):
    root, run, tok, sha = token_run
    assert file_sha256(run / "tokenizer.json") == sha
    model, cfg, _ = load_model(run)
    assert cfg.model.tokenizer_sha256 == sha and cfg.model.vocab_size == 320 == model.cfg.vocab_size


def test_eval_encodes_data_with_the_run_tokenizer(token_run, capsys):
    root, run, tok, _ = token_run
    out = root / "eval.json"
    assert moe_main(["eval", str(run), "--data", str(root / "data.txt"), "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "tokenized with tokenizer.json" in res["data"] and res["val_loss"] < 7.0  # ln 320 = 5.77 at init
    capsys.readouterr()
    assert moe_main(["eval", str(run), "--device", "cpu"]) == 2  # the byte corpus would be the wrong vocabulary
    err = capsys.readouterr().err.strip()
    assert "BPE tokens" in err and "\n" not in err


def test_generate_picks_up_the_tokenizer_and_decodes_text(token_run, capsys):
    root, run, tok, _ = token_run
    prompt = "Les experts"
    out = root / "gen.json"
    capsys.readouterr()
    assert moe_main(["generate", "--checkpoint", str(run), "--gpu-expert-slots", "4", "--device", "cpu",
                     "--prompt", prompt, "--max-new-tokens", "6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.split("\n---\n")[0]
    new = json.loads(out.read_text())["tokens"][0]
    assert len(new) == 6 and all(0 <= t < 320 for t in new)
    assert printed == tok.decode(tok.encode(prompt).ids + new) and printed.startswith(prompt)


def test_generate_without_the_run_tokenizer_is_one_clear_error(token_run, tmp_path, capsys):
    root, run, tok, _ = token_run
    bare = tmp_path / "bare"
    shutil.copytree(run / "checkpoints", bare / "checkpoints")
    args = ["generate", "--checkpoint", str(bare), "--gpu-expert-slots", "4", "--device", "cpu",
            "--prompt", "Die", "--max-new-tokens", "2"]
    capsys.readouterr()
    assert moe_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--tokenizer" in err and "\n" not in err
    assert moe_main(args + ["--tokenizer", str(root / "bpe.json")]) == 0  # named explicitly: fine
    other = train_bpe([TEXT[::-1]], vocab_size=320)
    save_tokenizer(other, tmp_path / "other.json")
    capsys.readouterr()
    assert moe_main(args + ["--tokenizer", str(tmp_path / "other.json")]) == 2
    assert "sha256" in capsys.readouterr().err
    loaded, _ = load_tokenizer_file(run / "tokenizer.json")
    assert loaded.to_str() == tok.to_str()


def test_serve_picks_up_the_tokenizer_and_decodes_text(token_run):
    pytest.importorskip("openai")
    from tests.serve_support import ThreadServer, completion  # noqa: F401 (importorskips the serve extras)
    import openai
    root, run, tok, _ = token_run
    srv = ThreadServer(run, "--api-key", "k", "--max-batch", "2")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0, timeout=60)
        r = client.completions.create(model="tok-tiny", prompt="Los expertos", max_tokens=5, temperature=0,
                                      extra_body={"return_token_ids": True})
        choice = r.model_dump()["choices"][0]
        ids = choice["token_ids"]
        assert len(ids) == 5 and all(0 <= t < 320 for t in ids)
        assert choice["text"] == tok.decode(ids)
        assert r.usage.prompt_tokens == len(tok.encode("Los expertos").ids)
    finally:
        srv.stop()
