"""Expert-parallel training on Ray actors, from the Python API.

    python examples/cluster_train.py        # ~20 s on a 2-core laptop CPU: 2 workers, EP=2, 20 steps

What it does: starts an embedded local Ray cluster (or joins the one in RAY_ADDRESS), places two
CPU workers (one core each) in a placement group, joins them in one gloo process group, and trains
a shrunken `tiny` preset with each worker holding 4 of the 8 experts of every MoE layer; tokens
reach their experts by all-to-all and the load-balancing loss uses expert counts of the global
batch. Then it loads the sharded checkpoint into one process and generates a few bytes.

The same from the command line, locally or on a Ray cluster:

    moe train --preset tiny --workers 2 --ep 2 --max-steps 20 --batch-size 4 --seq-len 64 --out runs/cluster-demo
    ray job submit --working-dir . --runtime-env-json "$(python -m cluster.job --print-runtime-env)" \\
        -- python -m moe train --preset tiny --workers 4 --ep 4 --out /shared/runs/tiny-ep4

`batch_size` is per worker: the global batch is batch_size x workers x grad_accum, and the run
equals a single process training on that global batch (tests/test_cluster_ray.py checks it).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.job import ClusterTrainer  # noqa: E402
from cluster.layout import ClusterConfig  # noqa: E402
from moe import get_preset, load_model  # noqa: E402

run = get_preset("tiny")
run.train.max_steps, run.train.batch_size, run.train.seq_len = 20, 4, 64
run.train.eval_interval = run.train.ckpt_interval = 10
run.train.device = "cpu"
run.model.moe.balance_scope = "global_batch"       # f_i over every worker and micro-batch of the step

cluster = ClusterConfig(workers=2, ep=2,           # 2 Ray actors, each owning 4 of the 8 experts
                        max_failures=1,            # a dead worker: tear down, recreate, resume from checkpoint
                        offload_experts=False)     # True: expert shards + AdamW state in host memory
trainer = ClusterTrainer(run, cluster, out_dir="runs/cluster-demo")
summary = trainer.fit()                            # resumes if runs/cluster-demo has checkpoints

last = [r for r in summary["history"] if "rank_load" in r][-1]
print(f"step {summary['step']}: train loss {summary['final_loss']:.3f}, "
      f"val loss {summary['last_eval']['val_loss']:.3f}, failures {summary['failures']}")
print(f"rows computed per worker in the last step: {last['rank_load']}; per expert: {last['expert_load']}")

model, cfg, ckpt = load_model("runs/cluster-demo")  # the EP=2 checkpoint loads into one process (EP=1)
print(f"checkpoint {ckpt.path.name} written as {ckpt.manifest.layout}; sample:")
out = model.generate(torch.tensor([list(b"def ")]), 40)[0].tolist()
print(repr(bytes(out).decode(errors="replace")))
