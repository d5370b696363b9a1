"""Ray orchestration and torch.distributed: expert-parallel training on a group of actors.

    layout.py    ClusterConfig, the W x EP layout and its validation (refused before actors start)
    groups.py    world / EP / replica process groups; spawn_gloo (local processes, no Ray)
    dispatch.py  AllToAllDispatcher (expert parallel), the global-batch count all-reduce
    shard.py     expert sharding, gradient all-reduce, global-norm clipping
    offload.py   host-memory expert shards streamed per layer (ZeRO-Offload style)
    ckpt.py      checkpoints sharded by owner, loadable at any EP
    engine.py    RankTrainer: one rank's training loop
    actors.py    Worker actor, WorkerGroup, placement group, rendezvous + process group
    fault.py     liveness, teardown, restart from the last committed checkpoint
    job.py       ClusterTrainer (Python API), `moe train --workers N` hook, `python -m cluster.job`

Importing `cluster` imports nothing heavy; Ray is needed only by actors.py, fault.py and job.py.
"""
