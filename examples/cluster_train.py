"""Expert-parallel training on Ray Train, from the Python API.

    python examples/cluster_train.py        # ~40 s on a 2-core laptop CPU: 2 workers, EP=2, 20 steps

What it does: starts an embedded local Ray cluster (or joins the one in RAY_ADDRESS) and runs a
Ray Train TorchTrainer with two CPU workers (one placement-group bundle each) joined in one gloo
process group. Each worker builds only the dense part and its 4 of the 8 experts of every MoE
layer (meta-device init); tokens reach their experts by all-to-all and the load-balancing loss
uses expert counts of the global batch. Every worker reports its own checkpoint shard to Ray
Train's storage (runs/cluster-demo/step_N). Then the sharded checkpoint is loaded into one
process and generates a few bytes.

The same from the command line, locally or on a Ray cluster (see the README's Ray section):

    moe train --preset tiny --workers 2 --ep 2 --max-steps 20 --batch-size 8 --seq-len 64 --name cluster-demo

`batch_size` is the global batch (each worker trains on batch_size / workers rows per micro-batch),
and the run equals one process training on the same config (tests/test_cluster_ray.py checks it).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_runtime.cluster.job import ClusterTrainer  # noqa: E402
from moe_runtime.cluster.layout import ClusterConfig  # noqa: E402
from moe_runtime import get_preset, load_model  # noqa: E402

run = get_preset("tiny")
run.name = "cluster-demo"
run.train.max_steps, run.train.batch_size, run.train.seq_len = 20, 8, 64
run.train.eval_interval = run.train.ckpt_interval = 10
run.train.device = "cpu"
run.model.moe.balance_scope = "global_batch"       # f_i over every worker and micro-batch of the step

cluster = ClusterConfig(workers=2, ep=2,           # 2 Ray Train workers, each owning 4 of the 8 experts
                        cpus_per_worker=1,         # one placement-group bundle of 1 CPU per worker
                        max_failures=1,            # a dead worker: Ray Train restarts the group from the checkpoint
                        storage="runs")            # a directory (resolved here) or a URI such as s3://bucket/runs
summary = ClusterTrainer(run, cluster).fit()       # resumes if runs/cluster-demo has checkpoints

last = [r for r in summary["history"] if "rank_load" in r][-1]
print(f"step {summary['step']}: train loss {summary['final_loss']:.3f}, val loss {summary['last_eval']['val_loss']:.3f}")
print(f"rows computed per worker in the last step: {last['rank_load']}; per expert: {last['expert_load']}")

model, cfg, ckpt = load_model("runs/cluster-demo")  # the EP=2 checkpoint loads into one process (EP=1)
print(f"checkpoint {ckpt.path.name} written as {ckpt.manifest.layout}; sample:")
out = model.generate(torch.tensor([list(b"def ")]), 40)[0].tolist()
print(repr(bytes(out).decode(errors="replace")))
