"""`ablate compare`: the claims table, the systems table and the plot, on tiny systems (fast), and the shipped
FastVLM claims file checked against the presets it names."""

from __future__ import annotations

import json
import types

import pytest

import ablate
from ablate.cli import main
from ablate.report.compare import Options, compare, load_claims, markdown

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


def test_timed_ratios_come_from_the_records(claims_file):
    result = compare(load_claims(str(claims_file)), Options(repeats=1, warmup=0, threads=1))
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
