"""Fuzz tier (default run, ~30 s on 2 cores): seeded mutations of a real checkpoint, routing trace
and configs (tests/fuzzing.py, the generator `python bench/fuzz.py --cases 2000` also uses).
Fails on any silent wrong load, exception outside the project's error types, unnamed refusal,
hang, or peak memory over 4 x file size + 200 MB."""
from __future__ import annotations

import collections

import pytest
import torch

from tests.fuzzing import FAILURES, KINDS, cases, make_seeds, run_case
from tests.helpers import single_thread  # noqa: F401,E402  (autouse: one torch thread)

N_CASES = 480


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("fuzz") / "seeds")


def test_fuzz_tier_has_no_silent_wrong_load_crash_hang_or_blow_up(seeds, tmp_path):
    results = [run_case(seeds, *c, tmp_path, bomb_mb=4.0) for c in cases(N_CASES, seed=12)]
    bad = [r for r in results if r["outcome"] in FAILURES]
    assert not bad, "\n".join(f"{r['target']}/{r['kind']} seed {r['seed']} ({r['detail']}): {r['outcome']} "
                              f"{r['message']}" for r in bad[:10])
    by_class = collections.Counter((r["target"], r["kind"], r["outcome"]) for r in results)
    for target, kinds in KINDS.items():  # every class ran and was refused at least once
        for kind in kinds:
            assert by_class[(target, kind, "refused")] > 0, (target, kind, by_class)


def test_the_classifier_catches_a_silent_wrong_load(seeds, tmp_path, monkeypatch):
    """Switch off the header and dtype checks (as on main before): resealed header edits must then
    count as failures, so this tier can fail."""
    from safetensors.torch import safe_open

    from moe_runtime.core.checkpoint import Checkpoint

    def unchecked_read(self, s, name, dtype):
        with safe_open(str(self.path / s.file), framework="pt") as fh:
            return fh.get_tensor(s.key)
    monkeypatch.setattr(Checkpoint, "_verify_file", lambda self, file: None)
    monkeypatch.setattr(Checkpoint, "_read", unchecked_read)
    outcomes = collections.Counter(run_case(seeds, "checkpoint", "header_edit", s, tmp_path)["outcome"]
                                   for s in range(12))
    assert outcomes["silent_wrong_load"] + outcomes["crash"] > 0, outcomes


def test_oracle_knows_every_config_field():
    # A config field added without its rule in the oracle makes every valid config look invalid to it.
    import dataclasses

    from moe_runtime.core.config import ModelConfig, MoEConfig, TrainConfig
    from tests.fuzz_oracle import _MODEL, _MOE, _TRAIN
    for cls, spec in ((TrainConfig, _TRAIN), (ModelConfig, _MODEL), (MoEConfig, _MOE)):
        names = {f.name for f in dataclasses.fields(cls)} - {"moe"}
        assert names == set(spec), f"{cls.__name__}: fields without an oracle rule {names - set(spec)}, " \
                                   f"rules without a field {set(spec) - names}"
