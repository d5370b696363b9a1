"""`moe train --workers N`: the cluster's options on the core `train` command (entry point in the
`moe_runtime.command_options` group, see core/cli.py). Only argparse here; Ray loads when a run starts.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Adds the cluster group to `moe train` and the function that runs a job when --workers > 0."""
    g = p.add_argument_group("cluster (Ray Train; needs moe-runtime[ray])")
    g.add_argument("--workers", type=int, default=0,
                   help="train on N Ray Train workers (0: one process). Ray: the cluster of --ray-address, else "
                        "of RAY_ADDRESS, else a new embedded local one. Each worker takes --cpus-per-worker cores")
    g.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: gcd(workers, num_experts))")
    g.add_argument("--storage", default=None,
                   help="checkpoint storage: an absolute directory or a URI (s3://...); relative paths resolve "
                        "against the current directory (refused inside `ray job submit`); default ./runs. "
                        "The run goes to <storage>/<name>")
    g.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    g.add_argument("--collective-timeout", type=float, default=120.0,
                   help="seconds before a stuck collective fails and names the rank that stopped")
    g.add_argument("--start-timeout", type=float, default=120.0,
                   help="seconds a (re)starting worker group may spend in worker start or process-group init "
                        "before the stuck worker is named and killed and --max-failures decides")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPU cores per worker bundle (fractions ok)")
    g.add_argument("--offload-experts", action="store_true", help="expert shards + AdamW state in host memory")
    g.add_argument("--overlap-grad-sync", choices=["auto", "on", "off"], default="auto",
                   help="all-reduce dense gradients during backward (on) or after it (off); auto: on with GPUs")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join ('auto': the running one; default: RAY_ADDRESS, else a new local one)")
    p.set_defaults(run_workers=train_cluster)


def train_cluster(run: Any, args: argparse.Namespace) -> int:
    """`moe train --workers N`: a Ray Train job (cluster/job.py); failures print one line."""
    from moe_runtime.cluster.job import ClusterInterrupted, ClusterTrainingError, run_cluster_train
    try:
        summary = run_cluster_train(run, args)
    except ClusterTrainingError as e:
        print(f"moe train: error: {e}", file=sys.stderr)
        return 1
    except ClusterInterrupted as e:  # Ctrl-C / SIGTERM: where it stopped, what a rerun resumes from
        print(e.message, file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("moe train: interrupted; rerun the same command (same --storage and --name) to resume from the "
              "run's newest checkpoint", file=sys.stderr, flush=True)
        return 130
    ev = summary.get("last_eval") or {}
    print(f"[moe] done at step {summary['step']}: val_loss {ev.get('val_loss', float('nan')):.4f}; checkpoints and "
          f"metrics.jsonl in {summary['run_dir']}", flush=True)
    return 0
