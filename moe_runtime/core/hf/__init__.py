"""Hugging Face MoE checkpoints <-> MoETransformer: load, stream experts, export, fine-tune.

Legend: L blocks, E experts, D model dim, F expert hidden dim, Fs shared/dense hidden dim, V vocab.

Families (config.json `architectures[0]`), each mapped field by field and tensor by tensor:

    family     architecture          attention                     FFN
    mixtral    MixtralForCausalLM    plain                         E experts, softmax top-k renormalised
    qwen2_moe  Qwen2MoeForCausalLM   q/k/v bias                    experts + shared expert * sigmoid gate
    olmoe      OlmoeForCausalLM      RMSNorm on q, k (all heads)   experts, norm_topk_prob from config
    qwen3_moe  Qwen3MoeForCausalLM   RMSNorm on q, k (per head)    experts, norm_topk_prob from config
    gpt_oss    GptOssForCausalLM     q/k/v/o bias, sinks, sliding  biased router; biased clamped-SwiGLU experts,
                                     window, YaRN (core/hf/gpt_oss.py)   float or MXFP4 (see gpt_oss.py)

Routed experts come in two layouts; both load and `export_hf` writes either:
    per_expert  what save_pretrained writes by default and what the Hub holds
        Mixtral: model.layers.{l}.block_sparse_moe.experts.{e}.w1 / w3 [F, D] (gate / up), w2 [D, F]
        others:  model.layers.{l}.mlp.experts.{e}.gate_proj / up_proj [F, D], down_proj [D, F]
    fused       transformers 5 in memory, save_pretrained(save_original_format=False)
        model.layers.{l}.mlp.experts.gate_up_proj [E, 2F, D] (rows [gate; up]), down_proj [E, D, F]
Ours: ExpertBank.w13_EDF2[e] = [gate^T | up^T], w2_EFD[e] = down^T.

Anything that would make our numbers differ from transformers' is refused with a message naming
the file and the field or tensor: an unknown architecture, a config field we do not model, a
missing, unexpected, mis-shaped or mis-typed tensor, an unreadable shard. The model is built on
the meta device, materialised once and filled in place shard by shard, so weights are never held
twice; `iter_hf_expert_tensors` streams experts one at a time for the expert-cache engine.
"""
from moe_runtime.core.hf.config import HFCheckpointError, finetune_defaults, ARCHITECTURES, EXPERT_LAYOUTS, TRAIN_ONLY_MOE_FIELDS
from moe_runtime.core.hf.plan import tensor_plan
from moe_runtime.core.hf.disk import HFCheckpoint, read_hf
from moe_runtime.core.hf.load import HFExpert, load_hf, load_hf_weights, iter_hf_expert_tensors, load_tokenizer, tokenized_corpus, hf_trainer_inputs, hf_run_config
from moe_runtime.core.hf.export import export_hf, hf_config, infer_family

__all__ = ['HFCheckpointError', 'HFCheckpoint', 'HFExpert', 'read_hf', 'load_hf', 'load_hf_weights', 'iter_hf_expert_tensors', 'load_tokenizer', 'tokenized_corpus', 'hf_trainer_inputs', 'hf_run_config', 'finetune_defaults', 'export_hf', 'hf_config', 'infer_family', 'tensor_plan', 'ARCHITECTURES', 'EXPERT_LAYOUTS', 'TRAIN_ONLY_MOE_FIELDS']
