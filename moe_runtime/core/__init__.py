"""Model math and the single-process product: configs, router and balance loss, experts, the model,
the training loop, checkpoints, data, Hugging Face load/export and the `moe` command's front door.

No torch.distributed and no Ray here, and nothing from moe_runtime.cluster or moe_runtime.offload
(those build on this package; their `moe` subcommands arrive through entry points, see cli.py).
The public names are the root's: `from moe_runtime import Trainer, load_model` (moe_runtime/__init__.py).
"""
