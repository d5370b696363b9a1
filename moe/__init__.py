"""moe-runtime: Mixture-of-Experts training and expert-offloading runtime.

Model math lives here (single process, no torch.distributed, no Ray). Ray and collectives live in
`cluster`, the expert cache in `offload`, kernels in `kernels`.
"""
from moe.checkpoint import Checkpoint, CheckpointError, latest_checkpoint
from moe.config import MoEConfig, ModelConfig, RunConfig, TrainConfig, get_preset, load_config, PRESETS
from moe.data import Corpus, load_corpus
from moe.layer import MoELayer
from moe.model import MoETransformer, KVCache
from moe.router import TopKRouter, BalanceTracker
from moe.train import Trainer, load_model

__version__ = "0.1.0"

__all__ = ["MoEConfig", "ModelConfig", "RunConfig", "TrainConfig", "get_preset", "load_config", "PRESETS",
           "Corpus", "load_corpus", "MoELayer", "MoETransformer", "KVCache", "TopKRouter", "BalanceTracker",
           "Trainer", "load_model", "Checkpoint", "CheckpointError", "latest_checkpoint"]
