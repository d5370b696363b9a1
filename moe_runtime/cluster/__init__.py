"""Ray Train and torch.distributed: expert-parallel training on a group of Ray Train workers.

    layout.py    ClusterConfig, FaultPlan, the W x EP layout and its validation (refused before workers start)
    groups.py    world / EP / replica process groups; spawn_gloo (local processes, no Ray)
    dispatch.py  AllToAllDispatcher (expert parallel), the global-batch count all-reduce
    shard.py     expert parameters, gradient all-reduce (overlapped with backward), global-norm clipping
    offload.py   host-memory expert shards streamed per layer (ZeRO-Offload style)
    ckpt.py      checkpoints sharded by owner, published to a directory or through Ray Train, loadable at any EP
    plan.py      EPPlan: one rank's part of core.train.Trainer's loop
    board.py     RunBoard: where ranks are, fatal errors, the name of a rank that hung
    worker.py    rank_main: what each Ray Train worker runs
    job.py       ClusterTrainer (a TorchTrainer), `moe train --workers N`, the `ray job submit` runtime_env

Importing `cluster` imports nothing heavy; Ray is needed only by job.py and worker.py.
"""
