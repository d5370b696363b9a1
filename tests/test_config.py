import json

import pytest

from moe_runtime.core.config import ConfigError, MoEConfig, ModelConfig, PRESETS, RunConfig, TrainConfig, get_preset, load_config, param_count


def test_presets_build_and_roundtrip():
    for name in PRESETS:
        run = get_preset(name)
        again = RunConfig.from_dict(run.to_dict())
        assert again == run
        assert param_count(run.model)["active"] < param_count(run.model)["total"] or run.model.moe.num_experts == run.model.moe.top_k


def test_real_model_shapes():
    mix = get_preset("mixtral-8x7b").model
    assert (mix.moe.num_experts, mix.moe.top_k, mix.d_model, mix.moe.d_expert) == (8, 2, 4096, 14336)
    # Mixtral-8x7B has ~46.7B parameters, ~12.9B active.
    c = param_count(mix)
    assert 46e9 < c["total"] < 47.5e9 and 12.5e9 < c["active"] < 13.5e9
    q = get_preset("qwen3-30b-a3b").model
    assert (q.moe.num_experts, q.moe.top_k, q.d_model, q.moe.d_expert) == (128, 8, 2048, 768)
    o = get_preset("olmoe-1b-7b").model
    assert (o.moe.num_experts, o.moe.top_k, o.moe.d_expert) == (64, 8, 1024)


@pytest.mark.parametrize("kw, match", [
    (dict(num_experts=4, top_k=5, d_expert=8), r"top_k=5 must be between 1 and num_experts=4"),
    (dict(num_experts=0, top_k=1, d_expert=8), r"num_experts=0 must be > 0"),
    (dict(num_experts=4, top_k=1, d_expert=8, score_func="relu"), r"score_func='relu' is not one of softmax, sigmoid"),
    (dict(num_experts=4, top_k=1, d_expert=8, balance_scope="batch"), r"balance_scope='batch' is not one of"),
    (dict(num_experts=4, top_k=1, d_expert=8, capacity_factor=0.0), r"capacity_factor=0.0 must be > 0"),
    (dict(num_experts=4, top_k=1, d_expert=8, shared_expert_gate=True), r"shared_expert_gate=True needs num_shared"),
    (dict(num_experts=4, top_k=1, d_expert=8, router_position="before"), r"router_position='before'"),
])
def test_moe_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kw)


def test_model_config_errors():
    moe = MoEConfig(num_experts=4, top_k=1, d_expert=8)
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by n_heads=4"):
        ModelConfig(d_model=30, n_layers=1, n_heads=4, moe=moe)
    with pytest.raises(ValueError, match=r"n_heads=4 is not divisible by n_kv_heads=3"):
        ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=3, moe=moe)
    with pytest.raises(ValueError, match=r"first_dense_layers=3 must be between 0 and n_layers=2"):
        ModelConfig(d_model=32, n_layers=2, n_heads=4, first_dense_layers=3, moe=moe)
    with pytest.raises(ValueError, match=r"grad_accum=0 must be > 0"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; available presets: tiny"):
        get_preset("huge")


def test_load_toml_and_json(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('name = "x"\n[model]\nd_model = 32\nn_layers = 2\nn_heads = 4\n'
                    '[model.moe]\nnum_experts = 4\ntop_k = 2\nd_expert = 16\n[train]\nmax_steps = 7\n')
    run = load_config(toml)
    assert run.name == "x" and run.train.max_steps == 7 and run.model.moe.d_expert == 16
    js = tmp_path / "m.json"
    js.write_text(json.dumps(run.to_dict()))
    assert load_config(js) == run


def test_load_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_expert = 3\n[model.moe]\nnum_experts=4\ntop_k=1\nd_expert=8\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_expert'\]"):
        load_config(bad)
    nomoe = tmp_path / "nomoe.toml"
    nomoe.write_text('[model]\nd_model = 32\nn_layers = 2\nn_heads = 4\n')
    with pytest.raises(ValueError, match=r"missing \[model.moe\] section"):
        load_config(nomoe)
    broken = tmp_path / "broken.toml"
    broken.write_text('[model\n')
    with pytest.raises(ValueError, match=r"is not valid TOML"):
        load_config(broken)
    with pytest.raises(ValueError, match=r"does not exist"):
        load_config(tmp_path / "missing.toml")
    missing_field = tmp_path / "mf.toml"
    missing_field.write_text('[model]\nd_model = 32\nn_layers = 2\nn_heads = 4\n[model.moe]\nnum_experts=4\ntop_k=1\n')
    with pytest.raises(ValueError, match=r"d_expert"):
        load_config(missing_field)


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, qk_norm="full", n_kv_heads=2),
                                dict(qk_norm="head", first_dense_layers=1, head_dim=6),
                                dict(tie_embeddings=True, moe=dict(num_experts=4, top_k=2, d_expert=24,
                                                                   num_shared_experts=1, d_shared_expert=16,
                                                                   shared_expert_gate=True)),
                                dict(qkv_bias=True, o_bias=True, attn_sinks=True, sliding_window=4,
                                     moe=dict(num_experts=4, top_k=2, d_expert=24, router_bias=True, expert_bias=True,
                                              expert_act="clamped_swiglu"))])
def test_param_count_matches_the_built_model(kw):
    from moe_runtime.core.model import MoETransformer
    from tests.helpers import small_model, small_moe
    if "moe" in kw:
        kw = {**kw, "moe": small_moe(**kw["moe"])}
    cfg = small_model(**kw)
    assert param_count(cfg)["total"] == sum(p.numel() for p in MoETransformer(cfg).parameters())


# ---------------------------------------------------------------- issue #12: types and ranges, one error each
@pytest.mark.parametrize("section, key, value, pattern", [
    ("model.moe", "norm_topk_prob", "false", r"norm_topk_prob='false' must be a bool, not str"),
    ("model.moe", "aux_free_bias", "no", r"aux_free_bias='no' must be a bool, not str"),
    ("model.moe", "num_experts", 8.0, r"num_experts=8.0 must be an int, not float"),
    ("model.moe", "top_k", True, r"top_k=True must be an int, not bool"),
    ("model", "n_kv_heads", 0, r"n_kv_heads=0 must be > 0"),
    ("model", "n_kv_heads", -2, r"n_kv_heads=-2 must be > 0"),
    ("model", "n_kv_heads", 3, r"n_heads=4 is not divisible by n_kv_heads=3"),
    ("model.moe", "capacity_factor", float("inf"), r"capacity_factor=inf must be a finite number"),
    ("model", "rope_theta", 0.0, r"rope_theta=0.0 must be > 0"),
    ("model", "rope_theta", -10000, r"rope_theta=-10000.0 must be > 0"),
    ("model", "init_std", -0.02, r"init_std=-0.02 must be >= 0"),
    ("model", "norm_eps", -1e-5, r"norm_eps=-1e-05 must be > 0"),
    ("train", "weight_decay", -0.1, r"weight_decay=-0.1 must be >= 0"),
    ("train", "beta1", 1.5, r"beta1=1.5 must be in \[0, 1\)"),
    ("model.moe", "balance_coef", float("inf"), r"balance_coef=inf must be a finite number"),
    ("model.moe", "balance_coef", float("nan"), r"balance_coef=nan must be a finite number"),
    ("train", "device", "tpu", r"device='tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("model.moe", "top_k", 9, r"top_k=9 must be between 1 and num_experts=8"),
    ("train", "seq_len", 4096, r"train.seq_len=4096 exceeds model.max_seq_len=128"),
    ("train", "lr", "3e-3", r"lr='3e-3' must be a float, not str"),
])
def test_json_config_values_checked_by_type_and_range(tmp_path, section, key, value, pattern):
    d = get_preset("tiny").to_dict()
    t = d
    for part in section.split("."):
        t = t[part]
    t[key] = value
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    where = "" if key == "seq_len" else rf"\[{section}\] "
    with pytest.raises(ConfigError, match=rf"^{p}: {where}{pattern}"):
        load_config(p)


def test_config_top_level_and_sections_of_the_wrong_type(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"{p}: the top level is a list"):
        load_config(p)
    p.write_text(json.dumps({"model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "moe": "small"}}))
    with pytest.raises(ConfigError, match=r"\[model.moe\] is a str 'small', expected a table"):
        load_config(p)


def test_float_fields_take_ints_and_stay_floats():
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, rope_theta=10000, moe=MoEConfig(num_experts=4, top_k=1,
                                                                                        d_expert=8, balance_coef=0))
    assert isinstance(cfg.rope_theta, float) and isinstance(cfg.moe.balance_coef, float)


def test_hf_config_import_shares_the_validation(tmp_path):
    from moe_runtime.core.hf import HFCheckpointError, read_hf
    d = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 64, "hidden_size": 16,
         "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "num_local_experts": 2, "num_experts_per_tok": 1, "max_position_embeddings": 64, "rms_norm_eps": -1e-6}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(HFCheckpointError, match=rf"{tmp_path / 'config.json'}: norm_eps=-1e-06 must be > 0"):
        read_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(HFCheckpointError, match=r"config.json: the top level is a list"):
        read_hf(tmp_path)
