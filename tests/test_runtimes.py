"""Runtimes (`run.runtime`): the plugin kind, its conformance suite (passed by ONNX Runtime and by a third-party
runtime defined here, failed by a runtime that freezes its example), and whole runs of `tiny` in ONNX Runtime."""

from __future__ import annotations

import importlib.util
import sqlite3

import pytest
import torch
from test_registry import plugin

import ablate
from ablate.api import Runtime, StageFallback, hookimpl, tensors_of, with_tensors
from ablate.api.errors import ConfigError, UnknownComponentError
from ablate.api.registry import Registry
from ablate.api.testing import RuntimeConformance
from ablate.cli import main
from ablate.measurement.quantization import INT4_NOTE, quantize, stored_bytes
from ablate_plugins.runtimes.executorch_runtime import ExecuTorchRuntime
from ablate_plugins.runtimes.onnx_runtime import OnnxRuntime
from ablate_plugins.runtimes.openvino_runtime import OpenVinoRuntime

FAST = dict(repeats=1, warmup=0)
STAGES = ("encoder", "reducer", "connector", "prefill")
HAS_ONNX = not OnnxRuntime.missing()
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra: pip install 'ablate-vlm[onnx]'")
needs_executorch = pytest.mark.skipif(
    bool(ExecuTorchRuntime.missing()), reason="needs the executorch extra: pip install 'ablate-vlm[executorch]'"
)
needs_openvino = pytest.mark.skipif(
    bool(OpenVinoRuntime.missing()), reason="needs the openvino extra: pip install 'ablate-vlm[openvino]'"
)
needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="needs the torchao extra: pip install 'ablate-vlm[torchao]'"
)


class Flat(torch.nn.Module):
    def __init__(self, stage):
        super().__init__()
        self.module, self.stage = stage.module, stage

    def forward(self, *tensors):
        return tuple(tensors_of(self.stage.run(with_tensors(self.stage.example, list(tensors)))))


class ExportRuntime(Runtime):
    """torch.export: each stage exported to an ExportedProgram (a third-party runtime, CONTRIBUTING's example)."""

    name = "torch-export"

    def prepare(self, stage):
        if not stage.static:
            raise StageFallback("its token count depends on the image")
        if stage.quantize:
            raise StageFallback(f"no {stage.quantize} in torch.export")
        program = torch.export.export(Flat(stage), tuple(tensors_of(stage.example))).module()
        return lambda value: with_tensors(stage.output, list(program(*tensors_of(value))))


class FrozenRuntime(Runtime):
    """Returns the example's eager output whatever it is given: what the suite must catch."""

    name = "frozen"

    def prepare(self, stage):
        return lambda value: stage.output


@needs_onnx
class TestOnnxRuntime(RuntimeConformance):
    runtime = OnnxRuntime


@needs_openvino
class TestOpenVinoRuntime(RuntimeConformance):
    runtime = OpenVinoRuntime


@needs_executorch
class TestExecuTorchRuntime(RuntimeConformance):
    runtime = ExecuTorchRuntime


class TestExportRuntime(RuntimeConformance):
    runtime = ExportRuntime
    check_registration = False  # no entry point: it lives in this test module


def test_the_suite_catches_a_runtime_that_freezes_its_example():
    suite = type("TestFrozen", (RuntimeConformance,), {"runtime": FrozenRuntime, "check_registration": False})()
    with pytest.raises(AssertionError, match="deviation from eager"):
        suite.test_a_connector_like_stage_matches_eager()
    with pytest.raises(AssertionError, match="example's token count"):
        suite.test_a_data_dependent_stage_falls_back_or_is_right()


def export_registry() -> Registry:
    registry = Registry()
    registry.load_entry_points()

    @hookimpl
    def register_runtimes(register):
        register(ExportRuntime)

    registry.add_plugin(plugin(register_runtimes=register_runtimes), "export-runtime", strict=True)
    return registry


def test_a_third_party_runtime_runs_a_whole_model_and_the_record_says_where():
    record = ablate.measure("tiny", registry=export_registry(), runtime="torch-export", **FAST).to_dict()
    execution = record["execution"]
    assert execution["requested"]["runtime"] == execution["used"]["runtime"] == "torch-export"
    assert execution["runtimes"] == {
        "encoder": "torch-export",
        "reducer": "no-op",
        "connector": "torch-export",
        "prefill": "torch-export",
    }
    assert set(execution["prepare_s"]) == {"encoder", "connector", "prefill"}
    assert all(value <= 1e-4 for value in execution["deviation_from_eager"].values())
    assert record["latency_ms"]["ttft"] > 0 and record["error"] is None


def test_under_another_runtime_the_vision_stages_run_there_and_the_steps_in_torch_labelled():
    record = ablate.measure(
        "tiny", registry=export_registry(), runtime="torch-export", max_new_tokens=3, **FAST
    ).to_dict()
    decode = record["decode"]
    assert decode["mode"] == "eager" and decode["steps"] == 2 and decode["end_to_end_ms"]["median"] > 0
    assert any(
        "the decode ran in torch, eagerly: runtime torch-export" in sentence
        for sentence in record["execution"]["fallbacks"]
    )


def test_the_torch_runtime_is_the_default_and_says_so():
    execution = ablate.measure("tiny", **FAST).to_dict()["execution"]
    assert execution["requested"]["runtime"] == execution["used"]["runtime"] == "torch"
    assert execution["runtimes"] == dict.fromkeys(STAGES, "torch") and execution["prepare_s"] is None


def test_a_plugin_cannot_take_the_core_runtime_name():
    class Impostor(Runtime):
        """Not torch."""

        name = "torch"

    @hookimpl
    def register_runtimes(register):
        register(Impostor)

    registry = Registry()
    registry.add_plugin(plugin(register_runtimes=register_runtimes), "impostor")
    assert "ablate's own" in registry.plugins["impostor"].error
    with pytest.raises(UnknownComponentError, match="Available runtimes: torch"):
        registry.runtime("tensorrt")


def test_modes_belong_to_torch():
    with pytest.raises(ConfigError, match="run.mode=compile is a mode of the torch runtime"):
        ablate.plan("tiny", runtime="torch-export", mode="compile", registry=export_registry())


@needs_onnx
def test_tiny_runs_in_onnx_runtime_within_1e4_of_eager():
    record = ablate.measure("tiny", runtime="onnxruntime", **FAST).to_dict()
    execution = record["execution"]
    assert execution["used"]["runtime"] == "onnxruntime" and execution["fallbacks"] == []
    assert execution["runtimes"] == {
        "encoder": "onnxruntime",
        "reducer": "no-op",
        "connector": "onnxruntime",
        "prefill": "onnxruntime",
    }
    deviations = execution["deviation_from_eager"]
    assert set(deviations) == set(STAGES) and all(0 <= value <= 1e-4 for value in deviations.values()), deviations
    assert all(seconds > 0 for seconds in execution["prepare_s"].values())
    assert any(note.startswith("runtime onnxruntime") for note in record["notes"])


@needs_openvino
def test_tiny_runs_in_openvino_and_the_prefill_falls_back_labelled():
    """OpenVINO's converter cannot take the decoder's KV-cache writes (a concatenation onto an empty cache)."""
    execution = ablate.measure("tiny", runtime="openvino", **FAST).to_dict()["execution"]
    assert execution["runtimes"] == {
        "encoder": "openvino",
        "reducer": "no-op",
        "connector": "openvino",
        "prefill": "torch",
    }
    (fallback,) = execution["fallbacks"]
    assert fallback.startswith("the prefill stage does not run in openvino (openvino.convert_model failed:")
    assert all(value <= 1e-4 for value in execution["deviation_from_eager"].values())


@needs_executorch
def test_tiny_runs_in_executorch_with_xnnpack_within_1e4_of_eager():
    record = ablate.measure("tiny", runtime="executorch", **FAST).to_dict()
    execution = record["execution"]
    assert execution["runtimes"] == {
        "encoder": "executorch",
        "reducer": "no-op",
        "connector": "executorch",
        "prefill": "executorch",
    }
    assert execution["fallbacks"] == [] and all(v <= 1e-4 for v in execution["deviation_from_eager"].values())
    assert any("XNNPACK" in note for note in record["notes"])


@needs_onnx
def test_a_data_dependent_reducer_falls_back_to_torch_labelled():
    record = ablate.measure("tiny", ["reducer=prumerge"], runtime="onnxruntime", **FAST).to_dict()
    execution = record["execution"]
    assert execution["runtimes"]["reducer"] == "torch" and execution["stages"]["reducer"] == "eager"
    assert execution["used"]["runtime"] == "mixed" and execution["used"]["mode"] == "eager"
    (fallback,) = execution["fallbacks"]
    assert "reducer stage does not run in onnxruntime" in fallback and "depends on the image" in fallback
    assert execution["runtimes"]["connector"] == execution["runtimes"]["prefill"] == "onnxruntime"
    assert all(value <= 1e-4 for value in execution["deviation_from_eager"].values())


@needs_onnx
def test_bfloat16_stages_fall_back_and_say_why():
    execution = ablate.measure("tiny", ["run.dtypes.decoder=bfloat16"], runtime="onnxruntime", **FAST).to_dict()[
        "execution"
    ]
    assert execution["runtimes"]["prefill"] == "torch" and execution["runtimes"]["encoder"] == "onnxruntime"
    assert any("bfloat16" in sentence and "prefill" in sentence for sentence in execution["fallbacks"])


# ------------------------------------------------------------------------------------------------ quantization

INT8_DEVIATION = 5e-2  # the stated bound for int8-dynamic on `tiny`: max relative deviation from float eager


def test_int8_dynamic_in_torch_stores_a_quarter_of_the_linear_weights_and_measures_fidelity():
    record = ablate.measure("tiny", ["run.quantize.connector=int8-dynamic"], **FAST).to_dict()
    quantization = record["quantization"]
    assert quantization["schemes"] == {"connector": "int8-dynamic"}
    ratio = quantization["quantized_bytes"]["connector"] / quantization["float_bytes"]["connector"]
    assert 0.2 < ratio < 0.35, ratio  # int8 weights, float32 biases and scales: about a quarter
    fidelity = quantization["fidelity"]
    assert fidelity["rows"] == 1 and 0 <= fidelity["top1_agreement"] <= 1 and fidelity["kl"] >= 0
    assert "unquantized" in fidelity["reference"]
    assert record["fidelity"] is None  # run.fidelity (against no reducer) stays what it was


def _linear_stack() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 128, bias=False))


@needs_torchao
@pytest.mark.parametrize(
    "scheme, low, high",  # bytes of the quantized Linear weights over float32's
    [
        ("int8-weight-only", 0.25, 0.26),  # a byte a weight, a float32 scale (and zero point) per output row
        ("int4-weight-only", 0.25, 0.28),  # an int4 value a byte (INT4_NOTE), a scale and zero point per 64
    ],
)
def test_torchao_weights_are_counted_as_stored(scheme, low, high):
    """torchao's quantized weights are tensor subclasses whose dtype is the float they stand for: counted by that
    dtype they would weigh as much as float32; what they store is their int8 data and scales."""
    model = _linear_stack()
    float_bytes = stored_bytes(model)
    assert float_bytes == (256 * 512 + 512 * 128) * 4
    x = torch.randn(3, 256)
    expected = model(x)
    quantize(model, scheme)
    assert type(model[0].weight) is not torch.nn.Parameter  # torchao replaced it
    assert low < stored_bytes(model) / float_bytes < high
    error = (model(x) - expected).abs().max() / expected.abs().max()
    assert 0 < error < (0.02 if scheme.startswith("int8") else 0.2), error


@needs_torchao
@pytest.mark.parametrize("scheme", ["int8-weight-only", "int4-weight-only"])
def test_torchao_schemes_on_tiny_record_their_bytes_and_fidelity(scheme):
    overrides = [f"run.quantize.connector={scheme}", f"run.quantize.decoder={scheme}"]
    record = ablate.measure("tiny", overrides, **FAST).to_dict()
    quantization = record["quantization"]
    assert quantization["schemes"] == {"connector": scheme, "decoder": scheme}
    ratio = quantization["quantized_bytes"]["connector"] / quantization["float_bytes"]["connector"]
    assert 0.2 < ratio < 0.35, ratio  # the connector is Linear layers only: about a quarter, float32 biases aside
    # the decoder's float32 embedding table stays: it shrinks, by less
    assert quantization["quantized_bytes"]["decoder"] < 0.9 * quantization["float_bytes"]["decoder"], quantization
    fidelity = quantization["fidelity"]
    assert 0 <= fidelity["top1_agreement"] <= 1 and 0 <= fidelity["kl"] < 0.1, fidelity
    assert (INT4_NOTE in record["notes"]) == (scheme == "int4-weight-only")


@needs_torchao
@needs_onnx
def test_a_torchao_scheme_in_onnx_runtime_falls_back_to_torch_labelled():
    record = ablate.measure("tiny", ["run.quantize.connector=int8-weight-only"], runtime="onnxruntime", **FAST)
    execution = record.to_dict()["execution"]
    assert execution["runtimes"]["connector"] == "torch" and execution["runtimes"]["encoder"] == "onnxruntime"
    assert any("int8-weight-only" in sentence for sentence in execution["fallbacks"])
    assert record.quantization.quantized_bytes["connector"] < 0.35 * record.quantization.float_bytes["connector"]


def test_a_quantized_runs_roofline_reads_the_weights_as_stored_and_counts_the_int8_matmuls():
    """Against float32's bytes an int8 prefill could beat its floor; the floor is of the bytes it must read. The
    decode step's FLOPs are the float model's: FlopCounterMode alone does not see torch's quantized Linear."""
    plain = ablate.measure("tiny", ["run.max_new_tokens=2"], **FAST)
    record = ablate.measure("tiny", ["run.quantize.decoder=int8-dynamic", "run.max_new_tokens=2"], **FAST)
    saved = record.quantization.float_bytes["decoder"] - record.quantization.quantized_bytes["decoder"]
    assert saved > 0
    for stage in ("prefill", "decode_step"):
        assert record.roofline.stages[stage].bytes == plain.roofline.stages[stage].bytes - saved, stage
    assert record.decode.step_flops == plain.decode.step_flops > 0


def test_an_unquantized_run_has_no_quantization_block():
    assert ablate.measure("tiny", **FAST).quantization is None


def test_quantizing_a_bfloat16_component_is_refused():
    with pytest.raises(ConfigError, match="quantizes float32 weights"):
        ablate.plan("tiny", ["run.quantize.decoder=int8-dynamic", "run.dtypes.decoder=bfloat16"])


@needs_onnx
def test_int8_dynamic_in_onnx_runtime_is_its_own_and_stays_within_the_stated_bound():
    overrides = ["run.quantize.connector=int8-dynamic", "run.quantize.decoder=int8-dynamic"]
    record = ablate.measure("tiny", overrides, runtime="onnxruntime", **FAST).to_dict()
    assert record["execution"]["runtimes"]["connector"] == record["execution"]["runtimes"]["prefill"] == "onnxruntime"
    quantization = record["quantization"]
    for kind in ("connector", "decoder"):
        assert quantization["quantized_bytes"][kind] < 0.35 * quantization["float_bytes"][kind], quantization
    assert quantization["fidelity"]["top1_agreement"] is not None
    deviations = record["execution"]["deviation_from_eager"]
    assert 0 < deviations["prefill"] <= INT8_DEVIATION, deviations  # against float eager: the int8 error shows


@needs_openvino
@pytest.mark.parametrize(
    "scheme, high",  # the connector's compressed bytes over float32's
    [("int8-dynamic", 0.3), ("int8-weight-only", 0.3), ("int4-weight-only", 0.2)],  # int4: two values a byte
)
def test_openvino_quantizes_with_its_own_nncf_compression_within_the_stated_bound(scheme, high):
    record = ablate.measure("tiny", [f"run.quantize.connector={scheme}"], runtime="openvino", **FAST).to_dict()
    assert record["execution"]["runtimes"]["connector"] == "openvino", record["execution"]["fallbacks"]
    quantization = record["quantization"]
    ratio = quantization["quantized_bytes"]["connector"] / quantization["float_bytes"]["connector"]
    assert 0.1 < ratio < high, ratio
    assert 0 <= quantization["fidelity"]["kl"] < 0.1, quantization["fidelity"]
    deviation = record["execution"]["deviation_from_eager"]["connector"]
    assert 0 < deviation <= (INT8_DEVIATION if scheme.startswith("int8") else 0.2), deviation
    assert any(note.startswith(f"openvino connector: {scheme} as NNCF's") for note in record["notes"])
    assert INT4_NOTE not in record["notes"]  # torchao's storage note: OpenVINO packs its int4 itself


@needs_executorch
def test_executorch_int8_dynamic_is_xnnpacks_own_and_a_weight_only_scheme_falls_back():
    overrides = ["run.quantize.connector=int8-dynamic", "run.quantize.decoder=int8-weight-only"]
    record = ablate.measure("tiny", overrides, runtime="executorch", **FAST).to_dict()
    runtimes, quantization = record["execution"]["runtimes"], record["quantization"]
    assert runtimes["connector"] == "executorch" and runtimes["prefill"] == "torch", record["execution"]
    assert any("XNNPACK has no int8-weight-only" in sentence for sentence in record["execution"]["fallbacks"])
    ratio = quantization["quantized_bytes"]["connector"] / quantization["float_bytes"]["connector"]
    assert 0.2 < ratio < 0.4, ratio  # int8 weights, float32 biases and scales, the program's structure
    assert 0 < record["execution"]["deviation_from_eager"]["connector"] <= INT8_DEVIATION
    assert any(note.startswith("executorch connector: int8-dynamic") for note in record["notes"])


@needs_onnx
def test_a_grid_over_runtime_and_reducer_stores_and_plots(tmp_path):
    db, out = tmp_path / "r.db", tmp_path / "plots"
    sweep = ["run.runtime=torch,onnxruntime", "reducer=none,prumerge"]
    assert main(["grid", "tiny", *sweep, "--db", str(db), "--repeats", "1", "--warmup", "0"]) == 0
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT runtime, status FROM cells").fetchall()
    assert sorted(rows) == [("onnxruntime", "ok")] * 2 + [("torch", "ok")] * 2
    assert main(["plot", "--db", str(db), "--out", str(out)]) == 0
    html = (out / "ttft_vs_tokens.html").read_text()
    assert "onnxruntime" in html and "prumerge" in html  # the cells' labels name both axes


# ------------------------------------------------------------------------------------------------ ablate export


@needs_onnx
def test_export_writes_files_a_hand_written_onnx_runtime_pipeline_reproduces(tmp_path, capsys):
    """The exported graphs, loaded by onnxruntime alone and chained by the manifest's names, give example.npz's
    logits: what a user on another machine does."""
    import json

    import numpy as np
    import onnxruntime

    folder = tmp_path / "export"
    assert main(["export", "tiny", "--runtime", "onnxruntime", "--out", str(folder)]) == 0
    assert "exported 3 of 4 stages" in capsys.readouterr().out
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == list(STAGES) and manifest["runtime"] == "onnxruntime"
    example = np.load(folder / "example.npz")
    values = {"pixel_values": example["pixel_values"], "input_ids": example["input_ids"]}
    for stage in manifest["stages"]:
        if stage["runtime"] == "no-op":
            continue
        assert all((folder / name).is_file() for name in stage["files"])
        session = onnxruntime.InferenceSession(str(folder / stage["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in stage["inputs"]]
        outputs = [o["name"] for o in stage["outputs"]]
        results = session.run(outputs, {i["name"]: values[i["name"]] for i in stage["inputs"]})
        for spec, result in zip(stage["outputs"], results):
            assert list(result.shape) == spec["shape"]
            values[spec["name"].removesuffix("_out")] = result
    logits = example["logits"]
    assert np.abs(values["logits"] - logits).max() <= 1e-4 * np.abs(logits).max()
