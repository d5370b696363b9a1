"""Model math and the single-process product: configs, router and balance loss, experts, the model,
the training loop, checkpoints, data, Hugging Face load/export and the `moe` command's front door.

No torch.distributed and no Ray here, and nothing from moe_runtime.cluster or moe_runtime.offload
(those build on this package; their `moe` subcommands arrive through entry points, see cli.py).
The public names are re-exported by the root: `from moe_runtime import Trainer, load_model`.
"""
from moe_runtime.core.checkpoint import Checkpoint, CheckpointError, latest_checkpoint
from moe_runtime.core.config import MoEConfig, ModelConfig, RunConfig, TrainConfig, get_preset, load_config, PRESETS
from moe_runtime.core.data import Corpus, load_corpus
from moe_runtime.core.layer import MoELayer
from moe_runtime.core.model import MoETransformer, KVCache
from moe_runtime.core.router import TopKRouter, BalanceTracker
from moe_runtime.core.train import Trainer, load_model

__all__ = ["MoEConfig", "ModelConfig", "RunConfig", "TrainConfig", "get_preset", "load_config", "PRESETS",
           "Corpus", "load_corpus", "MoELayer", "MoETransformer", "KVCache", "TopKRouter", "BalanceTracker",
           "Trainer", "load_model", "Checkpoint", "CheckpointError", "latest_checkpoint"]
