import json

import pytest

from moe.config import MoEConfig, ModelConfig, PRESETS, RunConfig, TrainConfig, get_preset, load_config, param_count


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
                                                                   shared_expert_gate=True))])
def test_param_count_matches_the_built_model(kw):
    from moe.model import MoETransformer
    from tests.helpers import small_model, small_moe
    if "moe" in kw:
        kw = {**kw, "moe": small_moe(**kw["moe"])}
    cfg = small_model(**kw)
    assert param_count(cfg)["total"] == sum(p.numel() for p in MoETransformer(cfg).parameters())
