"""Projections per expert format (issue 20 item 3): bytes per expert from kernels/quant.expert_bytes,
slots at equal slot GiB, host RAM, host time from bench/quant_quality.json's host rows (refused when
the file lacks the format), device time by bytes (a stated assumption), and `moe trace simulate
--expert-dtype`."""
from __future__ import annotations

import json

import pytest

from moe_runtime.core.cli import build_parser, main
from moe_runtime.kernels import quant as kq
from moe_runtime.offload import projection as P
from moe_runtime.offload.synthetic import synthetic_trace

MIX = P.SHAPES["mixtral-8x7b"]


@pytest.fixture
def ratios(tmp_path):
    """A host-rows file: int8 half the bf16 time, int4 1.5x, no mxfp4."""
    path = tmp_path / "quant_quality.json"
    path.write_text(json.dumps({"date": "2026-12-07 22:42 UTC", "machine": "test CPU",
                                "args": {"host_d": 64, "host_f": 128},
                                "host_expert_path": [{"format": "bf16", "median_s": 2e-3},
                                                     {"format": "int8", "median_s": 1e-3},
                                                     {"format": "int4", "median_s": 3e-3}]}))
    return path


@pytest.mark.parametrize("dtype,group", [("bf16", None), ("int8", None), ("int4", 64), ("int4", 128), ("int4", 32)])
def test_bytes_copy_and_device_time_follow_the_format(ratios, dtype, group):
    f = P.ExpertFormat(dtype, group)
    cal = P.format_calibration("mixtral-8x7b", "h100-pcie5", f, host_ratios=ratios)
    nbytes = kq.expert_bytes(MIX.d_model, MIX.d_expert, dtype, group)
    assert cal.expert_bytes == nbytes
    assert cal.copy_s == pytest.approx(nbytes / P.LINKS["h100-pcie5"].bytes_per_s)
    flops = 6 * MIX.d_model * MIX.d_expert
    assert cal.device_s[0] == pytest.approx(nbytes / P.HBM_BYTES_PER_S + flops / P.DEVICE_FLOPS)


def test_bf16_format_is_the_plain_projection():
    a = P.projection_calibration("mixtral-8x7b", "h100-pcie5")
    b = P.format_calibration("mixtral-8x7b", "h100-pcie5", P.ExpertFormat("bf16"), host_ratios="/nonexistent.json")
    assert (a.expert_bytes, a.copy_s, a.host_s, a.device_s, a.attn_s) == (b.expert_bytes, b.copy_s, b.host_s,
                                                                           b.device_s, b.attn_s)


def test_slots_at_equal_gib_and_host_ram():
    """Mixtral: the memory of 64 bf16 experts (25%) holds 127 int8, 227 int4/64, 240 int4/128 experts."""
    b16 = kq.expert_bytes(4096, 14336, "bf16")
    got = [P.equal_gib_slots(64, 256, kq.expert_bytes(4096, 14336, d, g), b16)
           for d, g in (("bf16", None), ("int8", None), ("int4", 64), ("int4", 128))]
    assert got == [64, 127, 227, 240]
    assert P.equal_gib_slots(200, 256, kq.expert_bytes(4096, 14336, "int4", 64), b16) == 256  # capped at all experts
    c = P.format_constants("mixtral-8x7b", "h100-pcie5", P.ExpertFormat("int4", 64), bf16_fraction=0.25)
    assert c["equal_gib_slots"] == 227 and c["host_ram_gib"] == pytest.approx(256 * 99090432 / 2**30)
    assert c["bf16_host_ram_gib"] == pytest.approx(84.0)
    assert "assumption" in c["expert_source"]


def test_host_time_is_bf16_constant_times_the_measured_ratio(ratios):
    b16 = kq.expert_bytes(4096, 14336, "bf16")
    for dtype, ratio in (("int8", 0.5), ("int4", 1.5)):
        cal = P.format_calibration("mixtral-8x7b", "h100-pcie5", P.ExpertFormat(dtype), host_ratios=ratios)
        assert cal.host_s[0] == pytest.approx(P.HOST_S_PER_TOKEN_PER_BYTE * b16 * ratio)
        assert cal.host_s[2] == pytest.approx(4 * cal.host_s[0])  # linear in tokens, like bf16
    r, src = P.host_time_ratio(P.ExpertFormat("int4"), ratios)
    assert r == 1.5 and "quant_quality.json" in src and "2026-12-07" in src and "test CPU" in src


def test_a_file_without_the_format_is_refused(ratios, tmp_path):
    with pytest.raises(ValueError, match=r"quant_quality\.json: its host rows have no 'mxfp4' time"):
        P.format_calibration("gpt-oss-120b", "h100-pcie5", P.ExpertFormat("mxfp4"), host_ratios=ratios)
    with pytest.raises(ValueError, match=r"missing\.json: no such file.*bench/quant_quality\.py"):
        P.host_time_ratio(P.ExpertFormat("int8"), tmp_path / "missing.json")
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(ValueError, match="old.json: no 'host_expert_path'"):
        P.host_time_ratio(P.ExpertFormat("int8"), tmp_path / "old.json")


def test_the_repository_file_has_every_format():
    """bench/results/quant_quality.json (another bench keeps it) holds every format's host row."""
    for d in kq.FORMATS:
        r, src = P.host_time_ratio(P.ExpertFormat(d))
        assert r > 0 and P.HOST_RATIOS_FILE.name in src


def test_parse_formats():
    assert [f.label for f in P.parse_formats("bf16, int4,mxfp4", 32)] == ["bf16", "int4/32", "mxfp4"]
    with pytest.raises(ValueError, match="applies to int4 only"):
        P.parse_formats("int8", 32)
    with pytest.raises(ValueError, match="one of bf16, int8, int4, mxfp4"):
        P.parse_formats("fp8")
    with pytest.raises(ValueError, match="group size 16"):
        P.parse_formats("int4", 16)


def test_cli_flags_parse():
    a = build_parser().parse_args(["trace", "simulate", "t.trace", "--model-shape", "mixtral-8x7b", "--link",
                                   "h100-pcie5", "--expert-dtype", "bf16,int4", "--expert-group", "32",
                                   "--host-ratios", "r.json"])
    assert (a.expert_dtype, a.expert_group, a.host_ratios) == ("bf16,int4", 32, "r.json")


def _trace(tmp_path):
    return synthetic_trace(num_layers=2, num_experts=8, top_k=2, tokens=12, seed=0).save(tmp_path / "t.trace")


def test_cli_projects_each_format_at_equal_slot_memory(tmp_path, ratios, capsys):
    out = tmp_path / "rows.json"
    assert main(["trace", "simulate", str(_trace(tmp_path)), "--model-shape", "mixtral-8x7b", "--link", "h100-pcie5",
                 "--expert-dtype", "bf16,int8,int4", "--capacities", "25%", "--policies", "lru",
                 "--host-ratios", str(ratios), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the slot memory of 4 bf16 experts (25%) holds 7 int8 experts" in text
    assert "holds 14 int4/64 experts" in text and "host RAM GiB" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["expert_format"], r["capacity"], r["bf16_slots"]) for r in rows] == \
        [("bf16", 4, 4), ("int8", 7, 4), ("int4/64", 14, 4)]
    assert rows[2]["host_ram_gib"] == pytest.approx(23.625)
    assert rows[2]["projection"]["tokens_per_s"] > rows[0]["projection"]["tokens_per_s"]


def test_cli_refusals(tmp_path, ratios, capsys):
    t = str(_trace(tmp_path))
    assert main(["trace", "simulate", t, "--expert-dtype", "int4"]) == 2
    assert "add --model-shape" in capsys.readouterr().err
    assert main(["trace", "simulate", t, "--model-shape", "gpt-oss-120b", "--link", "pcie4", "--expert-dtype", "mxfp4",
                 "--host-ratios", str(ratios)]) == 2
    assert "no 'mxfp4' time" in capsys.readouterr().err


def test_device_slowdown_is_a_sensitivity_on_quantised_formats_only():
    base = P.format_calibration("mixtral-8x7b", "h100-pcie5", P.ExpertFormat("int8"))
    slow = P.format_calibration("mixtral-8x7b", "h100-pcie5", P.ExpertFormat("int8"), device_slowdown=2.0)
    assert slow.device_s == pytest.approx(tuple(2 * t for t in base.device_s))
    assert (slow.copy_s, slow.host_s) == (base.copy_s, base.host_s)
    b16 = P.format_calibration("mixtral-8x7b", "h100-pcie5", P.ExpertFormat("bf16"), device_slowdown=2.0)
    assert b16.device_s == P.projection_calibration("mixtral-8x7b", "h100-pcie5").device_s
    c = P.format_constants("mixtral-8x7b", "h100-pcie5", P.ExpertFormat("int8"), device_slowdown=2.0)
    assert c["expert_source"].startswith("sensitivity: 2x")


def test_cpu_time_preferred_and_fastest_bf16_path_is_the_baseline(tmp_path):
    """Rows with the thread's CPU time use it (wall time on a loaded host inflates long calls), and the
    ratio is taken against the fastest bf16 host path (torch's matmul where the C kernel is slower)."""
    path = tmp_path / "quant_quality.json"
    path.write_text(json.dumps({"host_measured": {"date": "2026-12-08 00:18 UTC", "machine": "cpu B"},
                                "host_expert_path": [
                                    {"format": "bf16", "median_s": 9e-3, "cpu_median_s": 4e-3},
                                    {"format": "bf16-torch", "median_s": 8e-3, "cpu_median_s": 2e-3},
                                    {"format": "int4", "median_s": 1e-3, "cpu_median_s": 1e-3}]}))
    r, src = P.host_time_ratio(P.ExpertFormat("int4"), path)
    assert r == pytest.approx(0.5)
    assert "CPU time" in src and "2026-12-08 00:18" in src and "cpu B" in src
