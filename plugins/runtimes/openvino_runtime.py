"""OpenVINO (`run.runtime=openvino`, extra `openvino`): each stage converted with openvino.convert_model on the run's
own shapes and compiled for the CPU, in float32 (INFERENCE_PRECISION_HINT f32: on a CPU with bfloat16 units OpenVINO
would otherwise compute in bfloat16) with torch's thread count.

Falls back to torch, saying why: a stage whose token count depends on the image (a converted graph fixes every
shape), a stage that is not float32, a quantized one (run.quantize: torch quantizes it; OpenVINO's own int8 needs
NNCF, not wired here), and any stage the converter or the compiler refuses.
"""

from __future__ import annotations

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
        if stage.quantize is not None:
            raise StageFallback(f"{stage.quantize} in OpenVINO needs NNCF, which this runtime does not use")
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
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            compiled = openvino.Core().compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - a graph the compiler refuses: torch runs the stage
            raise StageFallback(f"OpenVINO cannot compile the graph: {first_line(exc, width=160)}") from None
        if not self.notes:
            self.notes.append(f"runtime openvino {openvino.__version__}: CPU, float32, {self.threads} threads.")
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


def _why(exc: Exception) -> str:
    """The converter's summary line (which operations failed) when it gives one, else its first line."""
    summary = [line for line in str(exc).splitlines() if line.startswith("-- Conversion is failed for:")]
    return summary[0].removeprefix("-- ") if summary else first_line(exc, with_type=True, width=160)


@hookimpl
def register_runtimes(register):
    register(OpenVinoRuntime)
