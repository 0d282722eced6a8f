"""OpenVINO (`run.runtime=openvino`, extra `openvino`): each stage converted with openvino.convert_model on the run's
own shapes and compiled for the CPU, in float32 (INFERENCE_PRECISION_HINT f32: on a CPU with bfloat16 units OpenVINO
would otherwise compute in bfloat16) with torch's thread count.

run.quantize takes OpenVINO's own schemes: NNCF's weight compression of the converted graph (its MatMul,
embedding and convolution weights, per output channel; int4 in groups of 64, two values a byte), with the CPU
plugin quantizing activations on the fly for int8-dynamic (DYNAMIC_QUANTIZATION_GROUP_SIZE 32) and not for the
weight-only schemes (0).

Falls back to torch, saying why: a stage whose token count depends on the image (a converted graph fixes every
shape), a stage that is not float32, and any stage the converter or the compiler refuses.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch

from ablate.api import FlatStage, Runtime, RuntimeStage, StageFallback, first_line, hookimpl, tensors_of


class OpenVinoRuntime(Runtime):
    """OpenVINO: each stage converted with openvino.convert_model and compiled for the CPU (float32)."""

    name = "openvino"
    extra = "openvino"
    requires = ("openvino",)

    def prepare(self, stage: RuntimeStage):
        import openvino

        if not stage.static:
            raise StageFallback(
                "its token count depends on the image, and a converted graph fixes every shape to this image's"
            )
        if stage.device.type != "cpu":
            raise StageFallback(f"this runtime compiles for the CPU, and the run's device is {stage.device.type}")
        flat = FlatStage(stage)
        flat.require_float32("this runtime")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notices about constants: our shapes are fixed
                program = torch.export.export(flat, tuple(flat.inputs))
                model = openvino.convert_model(program)
        except Exception as exc:  # noqa: BLE001 - any converter failure: leave the stage to torch, saying why
            raise StageFallback(f"openvino.convert_model failed: {_why(exc)}") from None
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if stage.quantize is not None:
            model = _compressed(model, stage.quantize)
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = DYNAMIC_GROUP[stage.quantize]
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            compiled = openvino.Core().compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - a graph the compiler refuses: torch runs the stage
            raise StageFallback(f"OpenVINO cannot compile the graph: {first_line(exc, width=160)}") from None
        if not any(note.startswith("runtime openvino") for note in self.notes):
            self.notes.insert(0, f"runtime openvino {openvino.__version__}: CPU, float32, {self.threads} threads.")
        if stage.quantize is not None:
            self.notes.append(
                f"openvino {stage.name}: {stage.quantize} as NNCF's {NNCF_SCHEMES[stage.quantize][0].lower()} weight "
                f"compression, activations {'quantized on the fly' if DYNAMIC_GROUP[stage.quantize] else 'in float'}."
            )
        self.weight_bytes[stage.name] = sum(
            op.get_byte_size() for op in model.get_ops() if op.get_type_name() == "Constant"
        )
        # The graph keeps the inputs it reads, named after the program's: tensors_INDEX.
        feeds = [int(port.get_any_name().rpartition("_")[2]) for port in compiled.inputs]
        request = compiled.create_infer_request()

        def run(value):
            given = tensors_of(value)
            results = request.infer([given[i].detach().cpu().numpy() for i in feeds])
            return flat.rebuild(value, [torch.from_numpy(results[out].copy()) for out in compiled.outputs])

        return run


# run.quantize's schemes as NNCF weight compression: (mode, its keyword arguments), and the CPU plugin's group size
# for quantizing activations on the fly (0: none, the matmul in float on decompressed weights).
NNCF_SCHEMES = {
    "int8-dynamic": ("INT8_SYM", {}),
    "int8-weight-only": ("INT8_ASYM", {}),
    "int4-weight-only": ("INT4_ASYM", {"group_size": 64, "ratio": 1.0, "all_layers": True}),
}
DYNAMIC_GROUP = {"int8-dynamic": 32, "int8-weight-only": 0, "int4-weight-only": 0}


def _compressed(model, scheme: str):
    """`model` with its weights compressed by NNCF as `scheme` asks (StageFallback when NNCF cannot)."""
    try:
        import nncf
    except ImportError:
        raise StageFallback(f"{scheme} in OpenVINO needs nncf: pip install 'ablate-vlm[openvino]'") from None
    nncf.set_log_level(logging.ERROR)
    mode, options = NNCF_SCHEMES[scheme]
    if "group_size" in options:  # a weight whose input width the group does not divide is skipped, not an error
        skip = nncf.quantization.advanced_parameters.GroupSizeFallbackMode.IGNORE
        options = {**options, "advanced_parameters": nncf.AdvancedCompressionParameters(group_size_fallback_mode=skip)}
    # NNCF logs that torch has no CUDA here, and draws a progress bar on stdout (where `--json` writes the record):
    # neither is the user's business.
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = extension_log.level
    extension_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode), **options)
    except Exception as exc:  # noqa: BLE001 - a graph NNCF cannot compress: torch quantizes the stage
        raise StageFallback(f"nncf.compress_weights failed: {first_line(exc, width=160)}") from None
    finally:
        extension_log.setLevel(level)


def _why(exc: Exception) -> str:
    """The converter's summary line (which operations failed) when it gives one, else its first line."""
    summary = [line for line in str(exc).splitlines() if line.startswith("-- Conversion is failed for:")]
    return summary[0].removeprefix("-- ") if summary else first_line(exc, with_type=True, width=160)


@hookimpl
def register_runtimes(register):
    register(OpenVinoRuntime)
