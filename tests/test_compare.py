"""`ablate compare`: the claims table, the systems table and the plot, on tiny systems (fast), and the shipped
FastVLM claims file checked against the presets it names."""

from __future__ import annotations

import json
import types

import pytest

import ablate
from ablate.cli import main
from ablate.report.compare import Options, compare, load_claims, markdown, oriented, write

TINY_CLAIMS = """
title: tiny claims
layers_key: decoder.overrides.num_hidden_layers
systems:
  small: {config: tiny, llm_layers: 2}
  big: {config: tiny, overrides: [encoder.image_size=256], llm_layers: 2}
claims:
  - {claim: small reads 4x fewer tokens, fast: small, baseline: big, paper: {tokens: 4.0, ttft: 2.0}}
"""


@pytest.fixture()
def claims_file(tmp_path):
    path = tmp_path / "tiny-claims.yaml"
    path.write_text(TINY_CLAIMS)
    return path


def test_count_only_writes_table_and_plot(claims_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", str(claims_file), "--count-only", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = result["claims"][0]
    assert row["measured"]["tokens"] == 4.0 and row["paper"]["tokens"] == 4.0 and row["measured"]["ttft"] is None
    assert result["systems"]["big"]["visual_tokens"] == 16 and result["mode"] == "count-only"
    assert (out / "compare.png").stat().st_size > 1000 and "| small reads 4x fewer tokens |" in (
        out / "compare.md"
    ).read_text()


def test_count_only_table_has_flops(claims_file, tmp_path, capsys):
    assert main(["compare", str(claims_file), "--count-only", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    small = ablate.measure("tiny", count_only=True).flops.total
    big = ablate.measure("tiny", ["encoder.image_size=256"], count_only=True).flops.total
    assert result["claims"][0]["measured"]["flops"] == pytest.approx(big / small)
    table = (tmp_path / "compare.md").read_text()
    assert "| FLOPs |" in table.splitlines()[4] and f"{big / small:.3g}× fewer |" in table
    for name, total in (("small", small), ("big", big)):  # both tiny totals lie between 10 and 100 MFLOPs
        assert f"| {total / 1e6:.1f} MFLOPs |" in next(
            line for line in table.splitlines() if line.startswith(f"| {name} |")
        )


GAP_CLAIMS = """
title: gaps
systems:
  small: {config: tiny}
  big: {config: tiny, overrides: [encoder.image_size=256]}
  deep: {config: tiny, overrides: ["encoder.layers=[1,1,1,1,4]"]}  # more encoder blocks, as ConvLLaVA's fifth stage
claims:
  - {claim: a deeper encoder, fast: small, baseline: deep, paper: {encoder_params: 1.6, tokens: 1.0}}
  - {claim: big reads more, fast: big, baseline: small, paper: {tokens: 0.25}}
"""


def test_ratios_below_one_read_inverted(tmp_path):
    assert oriented(0.8, "ttft") == "1.25× slower" and oriented(3.2, "ttft") == "3.2× faster"
    assert oriented(0.5, "encoder_params") == "2× larger" and oriented(1.0, "tokens") == "equal"
    path = tmp_path / "gaps.yaml"
    path.write_text(GAP_CLAIMS)
    result = compare(load_claims(str(path)), Options(count_only=True))
    assert result["claims"][1]["measured"]["tokens"] == 4 / 16  # big reads 16 tokens, small 4
    line = next(line for line in markdown(result).splitlines() if line.startswith("| big reads more |"))
    assert "| 4× / 4× more |" in line and "0.25" not in line


def test_a_paper_gap_is_flagged_from_the_records(tmp_path):
    path = tmp_path / "gaps.yaml"
    path.write_text(GAP_CLAIMS)
    result = compare(load_claims(str(path)), Options(count_only=True))
    small = ablate.measure("tiny", count_only=True).params.encoder
    deep = ablate.measure("tiny", ["encoder.layers=[1,1,1,1,4]"], count_only=True).params.encoder
    assert deep / small > 1.6 * 1.25  # the setup: measured well beyond the paper's 1.6x
    row = result["claims"][0]
    gap = row["gaps"]["encoder_params"]
    assert gap["measured"] == pytest.approx(deep / small) and gap["apart"] == pytest.approx(deep / small / 1.6)
    assert f"about {1.6 * small / 1e6:,.1f}M; measured {deep / 1e6:,.1f}M" in gap["reason"]
    assert "tokens" not in row["gaps"] and not result["claims"][1]["gaps"]  # equal token counts: no flag
    table = markdown(result)
    assert "smaller ⚠ |" in table and "- a deeper encoder, encoder params: paper 1.6× smaller" in table


def test_timed_ratios_come_from_the_records(claims_file, tmp_path):
    result = compare(load_claims(str(claims_file)), Options(repeats=1, warmup=0, threads=1))
    write(result, tmp_path)  # the timed plot draws too
    assert (tmp_path / "compare.png").stat().st_size > 1000
    small, big = result["systems"]["small"], result["systems"]["big"]
    assert small["form"] == "float32" and not small["estimate"]
    ratio = result["claims"][0]["measured"]["ttft"]
    assert ratio == pytest.approx(big["latency_ms"]["ttft"] / small["latency_ms"]["ttft"])
    assert small["latency_ms"]["encoder"] > 0 and small["latency_ms"]["prefill"] > 0


def test_a_cut_llm_is_scaled_and_labelled_an_estimate(claims_file):
    result = compare(load_claims(str(claims_file)), Options(repeats=1, warmup=0, threads=1, max_llm_layers=1))
    small = result["systems"]["small"]
    assert small["estimate"] and "LLM 1 of 2 layers" in small["form"] and "estimates" in small["note"]
    assert result["claims"][0]["estimate"] and "~" in markdown(result)


def test_a_system_that_fits_nowhere_is_counted_not_skipped(claims_file):
    result = compare(load_claims(str(claims_file)), Options(repeats=1, warmup=0, memory_gb=1e-6))
    small = result["systems"]["small"]
    assert small["form"] == "count-only" and small["visual_tokens"] == 4 and "counted only" in small["note"]
    assert "| small |" in markdown(result)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bfloat16_is_the_fallback_only_where_the_cpu_computes_it(claims_file, monkeypatch, native_bf16):
    """float32 does not fit, bfloat16 would: on a CPU that only emulates bfloat16, cut the LLM in float32 instead."""
    import ablate.report.compare

    monkeypatch.setattr(ablate.report.compare, "cpu_features", lambda: types.SimpleNamespace(bf16=native_bf16))
    params = ablate.measure("tiny", count_only=True).to_dict()["params"]["total"]
    budget_gb = params * 3.0 * 1.2 / 2**30  # between bfloat16's 2 bytes a parameter and float32's 4
    result = compare(load_claims(str(claims_file)), Options(count_only=False, repeats=1, warmup=0, memory_gb=budget_gb))
    small = result["systems"]["small"]
    if native_bf16:
        assert small["form"] == "bfloat16" and "float32 does not fit" in small["note"]
    else:  # the tiny LLM's layers are too small a share for a cut to fit: counted, and the note says why
        assert small["form"] == "count-only" and "this CPU only emulates it" in small["note"]


def test_per_system_overrides(claims_file):
    result = compare(load_claims(str(claims_file)), Options(count_only=True, overrides=["big:encoder.image_size=192"]))
    assert result["systems"]["big"]["visual_tokens"] == 9 and result["claims"][0]["measured"]["tokens"] == 9 / 4


def test_the_fastvlm_claims_file_names_real_presets_and_depths():
    claims = load_claims("fastvlm")
    assert len(claims.claims) >= 4
    for system in claims.systems.values():
        vlm = ablate.build(system.config, system.overrides, meta=True)
        assert vlm.decoder.lm.config.num_hidden_layers == system.llm_layers, system.name
