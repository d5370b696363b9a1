"""The Python training API in ten lines.

    python examples/train_api.py            # ~20 s on a 2-core CPU: 60 steps of the tiny preset, then a sampled continuation
"""
import torch

from moe_runtime import Trainer, get_preset, load_model

run = get_preset("tiny")                           # or load_config("examples/configs/tiny.toml")
run.train.max_steps, run.train.eval_interval = 60, 30
run.model.moe.balance_scope = "global_batch"       # f_i over the whole optimizer step
trainer = Trainer(run, out_dir="runs/api-demo")    # default corpus: the Python stdlib's source
summary = trainer.fit()                            # resumes from runs/api-demo if it has checkpoints
print(summary["last_eval"]["val_loss"], trainer.corpus.unigram_entropy())
model, cfg, ckpt = load_model("runs/api-demo")     # newest valid checkpoint
out = model.generate(torch.tensor([list(b"def ")]), 60, temperature=0.8, generator=torch.Generator().manual_seed(0))
print(repr("def " + bytes(out[0].tolist()).decode(errors="replace")))
