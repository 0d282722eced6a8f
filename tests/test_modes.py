"""Execution modes, roofline figures and profiles: the mechanics, on the CPU with the tiny preset.

torch.compile takes tens of seconds even for the tiny model, so one compiled run (module fixture) serves several
tests; inductor's cache goes to a temporary folder that is removed afterwards. GPU-only paths (CUDA graphs, CUDA
event timing) run in the tests at the end when a GPU is present and are skipped otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from test_registry import plugin

import ablate
from ablate.api.components import EncoderConfig, ReducerConfig, StageContext, TokenReducer, VisionEncoder
from ablate.api.registry import Registry
from ablate.config.run_options import RunOptions
from ablate.measurement.machine import cpu_features
from ablate.measurement.modes import Replay
from ablate.measurement.record import Record
from ablate.measurement.roofline import PEAKS, device_peak, weight_bytes

FAST = dict(repeats=1, warmup=0)
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """Keep torch.compile's on-disk cache inside this test module's temporary folder."""
    folder = tmp_path_factory.mktemp("inductor")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
        patch.setenv("TRITON_CACHE_DIR", str(folder / "triton"))
        yield folder


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, inductor_cache):
    """One run asking for CUDA graphs on the CPU (falls back to compile), channels_last, with a profile."""
    trace = tmp_path_factory.mktemp("trace") / "trace.json"
    return ablate.measure(
        "tiny", mode="cudagraph", memory_format="channels_last", profile=str(trace), device="cpu", **FAST
    ).to_dict()


# ------------------------------------------------------------------------------------------------ eager


def test_eager_record_says_what_ran():
    record = ablate.measure("tiny", **FAST).to_dict()
    execution = record["execution"]
    assert execution["requested"]["mode"] == execution["used"]["mode"] == "eager"
    assert execution["used"]["memory_format"] == "contiguous"
    assert execution["stages"] == dict.fromkeys(("encoder", "reducer", "connector", "prefill"), "eager")
    assert execution["fallbacks"] == [] and execution["timer"] == "perf_counter"
    assert execution["deviation_from_eager"] is None and execution["setup_s"] is None
    assert execution["used"]["dtypes"]["encoder"] == "float32" and execution["used"]["dtypes"]["reducer"] is None
    assert set(execution) == set(Record().to_dict()["execution"])


def test_bfloat16_on_a_cpu_without_bf16_instructions_says_so():
    record = ablate.measure("tiny", dtype="bfloat16", **FAST).to_dict()
    assert record["execution"]["used"]["dtypes"]["decoder"] == "bfloat16"
    warned = any("no bfloat16 instructions" in note for note in record["notes"])
    assert warned == (not cpu_features().bf16)
    assert record["roofline"]["stages"]["prefill"]["dtype"] == "bfloat16"


# -------------------------------------------------------------------------------------------- roofline


def test_roofline_figures_are_consistent():
    record = ablate.measure("tiny", **FAST).to_dict()
    roofline = record["roofline"]
    peak = roofline["peak"]
    assert peak["tflops"]["float32"] > 0 and peak["bandwidth_gbs"] > 0 and "estimate" in peak["source"]
    stages = roofline["stages"]
    for stage in ("encoder", "connector", "prefill"):
        figures = stages[stage]
        assert figures["flops"] == record["flops"][stage] > 0
        compute_ms = figures["flops"] / (peak["tflops"]["float32"] * 1e12) * 1e3
        memory_ms = figures["bytes"] / (peak["bandwidth_gbs"] * 1e9) * 1e3
        assert figures["floor_ms"] == pytest.approx(max(compute_ms, memory_ms))
        assert figures["bound"] == ("compute" if compute_ms >= memory_ms else "memory")
        assert figures["measured_ms"] == record["latency_ms"][stage]
        assert figures["measured_over_floor"] == pytest.approx(figures["measured_ms"] / figures["floor_ms"])
        assert figures["intensity"] == pytest.approx(figures["flops"] / figures["bytes"])
        assert figures["eager_ms"] is None and figures["launch_bound"] is None  # only measured against a graph
    # The least traffic is at most what unfused operators move (the connector: two linears, fusing nothing).
    assert stages["encoder"]["bytes"] < stages["encoder"]["bytes_unfused"]
    assert stages["ttft"]["flops"] == record["flops"]["total"]
    assert stages["ttft"]["floor_ms"] == pytest.approx(
        sum(stages[s]["floor_ms"] for s in record["flops"] if s != "total")
    )
    assert stages["ttft"]["measured_ms"] == record["latency_ms"]["ttft"]


def test_weight_bytes_count_a_gathered_embedding_table_only_when_a_linear_shares_it():
    embedding, head = torch.nn.Embedding(100, 8), torch.nn.Linear(8, 100, bias=False)
    untied = torch.nn.ModuleList([embedding, head])
    assert weight_bytes(untied) == 100 * 8 * 4  # the head; the table is read row by row
    head.weight = embedding.weight
    assert weight_bytes(untied) == 100 * 8 * 4  # tied: one matrix, read whole by the head


def test_count_only_gives_floors_and_the_peak_override_moves_them():
    plain = ablate.measure("tiny", count_only=True).to_dict()
    faster = ablate.measure(
        "tiny", ["run.peak.tflops=1000", "run.peak.bandwidth_gbs=1000000"], count_only=True
    ).to_dict()
    encoder, fast_encoder = plain["roofline"]["stages"]["encoder"], faster["roofline"]["stages"]["encoder"]
    assert encoder["floor_ms"] > 0 and encoder["measured_ms"] is None and encoder["measured_over_floor"] is None
    assert fast_encoder["peak_tflops"] == 1000
    assert fast_encoder["floor_ms"] == pytest.approx(max(encoder["flops"] / 1e15 * 1e3, encoder["bytes"] / 1e15 * 1e3))
    assert (
        "overridden by run.peak.tflops for float32 and run.peak.bandwidth_gbs" in faster["roofline"]["peak"]["source"]
    )


def test_the_gpu_table_matches_device_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = device_peak(torch.device("cuda"), RunOptions())
    assert peak.tflops["bfloat16"] == 989.0 and peak.bandwidth_gbs == 3350.0 and "H100" in peak.source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GH200 480GB")
    assert device_peak(torch.device("cuda"), RunOptions()).bandwidth_gbs == dict(PEAKS)["GH200"]["bandwidth_gbs"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery Accelerator 9000")
    unknown = device_peak(torch.device("cuda"), RunOptions())
    assert unknown.tflops is None and "set run.peak" in unknown.source


# ------------------------------------------------------------------------------------ compile (and fallback)


def test_cudagraph_without_a_gpu_falls_back_to_compile_and_says_so(compiled):
    execution = compiled["execution"]
    assert execution["requested"]["mode"] == "cudagraph" and execution["used"]["mode"] == "compile"
    assert execution["stages"] == dict.fromkeys(("encoder", "reducer", "connector", "prefill"), "compile")
    assert len(execution["fallbacks"]) == 1 and "cudagraph needs a CUDA GPU" in execution["fallbacks"][0]
    assert any(note.startswith("fallback: mode cudagraph needs a CUDA GPU") for note in compiled["notes"])
    assert execution["ttft"] == "compiled stages called in turn" and execution["setup_s"] > 0
    assert execution["graph_breaks"] == dict.fromkeys(execution["stages"], 0)


def test_compile_matches_eager_numerically(compiled):
    deviation = compiled["execution"]["deviation_from_eager"]
    assert set(deviation) == {"encoder", "reducer", "connector", "prefill"}
    assert all(value is not None and value < 1e-4 for value in deviation.values()), deviation


def test_channels_last_is_applied_to_a_conv_encoder(compiled):
    assert compiled["execution"]["requested"]["memory_format"] == "channels_last"
    assert compiled["execution"]["used"]["memory_format"] == "channels_last"
    assert all(v > 0 for k, v in compiled["latency_ms"].items())


def test_profile_writes_a_trace_and_top_kernels_per_stage(compiled):
    profile = compiled["profile"]
    trace = json.loads(Path(profile["trace"]).read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"ablate/encoder", "ablate/connector", "ablate/prefill"} <= names
    assert set(profile["top"]) == {"encoder", "reducer", "connector", "prefill"}
    for stage in ("encoder", "connector", "prefill"):
        rows = profile["top"][stage]
        assert 0 < len(rows) <= 5 and all(row["self_ms"] > 0 and row["calls"] >= 1 for row in rows)
        assert [row["self_ms"] for row in rows] == sorted((row["self_ms"] for row in rows), reverse=True)
        assert sum(row["share"] for row in rows) <= 1 + 1e-9


@dataclass
class _PatchesConfig(EncoderConfig):
    image_size: int = 128


class _Patches(VisionEncoder):
    """Linear patch embedding only (no convolutions): 4 tokens of width 32."""

    name = "linear-patches"
    Config = _PatchesConfig

    def __init__(self, config):
        super().__init__(config)
        self.width = 32
        self.proj = torch.nn.Linear(3 * 64 * 64, self.width)

    def num_tokens(self, image_size=None):
        return 4

    def forward(self, ctx):
        x = ctx.pixel_values
        patches = x.unfold(2, 64, 64).unfold(3, 64, 64).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return replace(ctx, tokens=self.proj(patches), layout=self.output_layout())


class _BreaksUnderCompile(TokenReducer):
    """Keeps every token, but its code fails when torch.compile traces it (a shape error only the compiler sees)."""

    name = "breaks-under-compile"

    def forward(self, ctx):
        tokens = ctx.tokens * 1.0
        if torch.compiler.is_compiling():
            tokens = tokens @ torch.ones(3, 5)
        return replace(ctx, tokens=tokens)


_BreaksUnderCompile.Config = ReducerConfig


@pytest.fixture(scope="module")
def registry():
    registry = Registry()
    registry.load_entry_points()
    registry.add_plugin(
        plugin(
            register_encoders=lambda register: register(_Patches),
            register_reducers=lambda register: register(_BreaksUnderCompile),
        ),
        "test-modes",
    )
    return registry


def test_a_stage_that_breaks_under_compile_runs_eagerly_and_is_labelled(registry):
    record = ablate.measure(
        "tiny", ["encoder=linear-patches", "reducer=breaks-under-compile"], registry=registry, mode="compile", **FAST
    ).to_dict()
    execution = record["execution"]
    assert execution["stages"] == {
        "encoder": "compile",
        "reducer": "eager",
        "connector": "compile",
        "prefill": "compile",
    }
    assert execution["used"]["mode"] == "mixed" and execution["requested"]["mode"] == "compile"
    (fallback,) = execution["fallbacks"]
    assert fallback.startswith("the reducer stage failed to compile (TorchRuntimeError") and "ran eagerly" in fallback
    assert execution["deviation_from_eager"]["reducer"] < 1e-5
    assert record["latency_ms"]["reducer"] > 0 and record["error"] is None


def test_channels_last_on_an_encoder_without_convolutions_is_a_labelled_no_op(registry):
    record = ablate.measure(
        "tiny", ["encoder=linear-patches"], registry=registry, memory_format="channels_last", **FAST
    ).to_dict()
    execution = record["execution"]
    assert execution["requested"]["memory_format"] == "channels_last"
    assert execution["used"]["memory_format"] == "contiguous"
    assert "has no convolutions; kept contiguous" in execution["fallbacks"][0]


# ------------------------------------------------------------------------------------------ graph replay


class _Doubler:
    """Stands in for a CUDA graph on the CPU: replay recomputes into the static output buffer, as a graph does."""

    def __init__(self, static_input, static_output):
        self.static_input, self.static_output, self.replays = static_input, static_output, 0

    def replay(self):
        self.replays += 1
        self.static_output.tokens.copy_(self.static_input.tokens * 2)


def test_replay_copies_a_fresh_input_into_the_static_one_and_chains_without_copies():
    static_in = StageContext(tokens=torch.ones(1, 2, 3))
    first = _Doubler(static_in, StageContext(tokens=torch.zeros(1, 2, 3)))
    second = _Doubler(first.static_output, StageContext(tokens=torch.zeros(1, 2, 3)))
    stage_one = Replay(first, static_in, first.static_output)
    stage_two = Replay(second, first.static_output, second.static_output)
    fresh = StageContext(tokens=torch.full((1, 2, 3), 5.0))
    out = stage_two(stage_one(fresh))
    assert torch.equal(static_in.tokens, fresh.tokens)  # copied in
    assert torch.equal(out.tokens, torch.full((1, 2, 3), 20.0)) and out is second.static_output
    with pytest.raises(ValueError):  # a fresh input of another structure cannot be replayed
        stage_one(StageContext(tokens=torch.ones(1, 2, 3), cls=torch.ones(1, 3)))


# ----------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cudagraph_captures_every_stage_and_the_whole_ttft():
    record = ablate.measure("tiny", device="cuda", mode="cudagraph", repeats=3, warmup=1).to_dict()
    execution = record["execution"]
    assert execution["used"]["mode"] == "cudagraph" and execution["fallbacks"] == []
    assert execution["ttft"] == "one CUDA graph for the whole path" and execution["timer"] == "cuda-events"
    assert set(execution["eager_ms"]) >= {"encoder", "prefill", "ttft"}
    assert all(v is not None and v < 1e-3 for v in execution["deviation_from_eager"].values())
    ttft = record["roofline"]["stages"]["ttft"]
    assert ttft["eager_ms"] == execution["eager_ms"]["ttft"] and ttft["launch_bound"] is not None
    assert math.isclose(record["latency_ms"]["stage_sum"], record["latency_ms"]["ttft"], rel_tol=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cudagraph_with_a_data_dependent_reducer_says_ttft_is_not_one_graph():
    record = ablate.measure(
        "tiny",
        ["encoder=timm", "encoder.model_name=vit_tiny_patch16_224", "reducer=prumerge"],
        device="cuda",
        mode="cudagraph",
        repeats=2,
        warmup=1,
    ).to_dict()
    execution = record["execution"]
    assert execution["stages"]["reducer"] == "eager" and execution["stages"]["encoder"] == "cudagraph"
    assert execution["used"]["mode"] == "mixed" and "eager reducer" in execution["ttft"]
    assert any("not one graph" in note for note in record["notes"])


def test_the_cli_prints_floors_and_the_top_kernels(tmp_path, capsys):
    from ablate.cli import main

    trace = tmp_path / "eager.json"
    assert main(["run", "tiny", "--repeats", "1", "--warmup", "0", "--profile", str(trace)]) == 0
    printed = capsys.readouterr().out
    assert "floor ms" in printed and "x floor" in printed
    assert "top kernels per stage" in printed and "aten::" in printed
    assert "traceEvents" in json.loads(trace.read_text())


def test_the_timm_encoder_times_the_fused_form_unless_told_otherwise():
    from ablate.api.registry import get_registry

    cls = get_registry().get("encoder", "timm")
    pixels = StageContext(pixel_values=torch.rand(1, 3, 128, 128))
    encoders = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        config = cls.Config(name="timm", model_name="fastvit_t8", image_size=128, reparameterize=fuse)
        encoders[fuse] = cls(config).eval()
    assert (encoders[True].form, encoders[False].form) == ("inference", "train")
    assert sum(p.numel() for p in encoders[True].parameters()) < sum(p.numel() for p in encoders[False].parameters())
    with torch.no_grad():
        fused, branches = (encoders[fuse](pixels).tokens for fuse in (True, False))
    assert torch.allclose(fused, branches, atol=1e-5 * branches.abs().max().item())
    record = ablate.measure("tiny", ["encoder=timm", "encoder.model_name=fastvit_t8"], count_only=True).to_dict()
    assert record["encoder_form"] == "inference"
