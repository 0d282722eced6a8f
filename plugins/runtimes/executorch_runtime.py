"""ExecuTorch (`run.runtime=executorch`, extra `executorch`): each stage exported with torch.export on the run's own
shapes, lowered to the XNNPACK delegate (what ExecuTorch runs on phone CPUs) and run from its .pte program by
ExecuTorch's runtime, on this CPU.

run.quantize's int8-dynamic is XNNPACK's own: the exported stage quantized with torchao's pt2e flow and
XNNPACKQuantizer (int8 weights per output channel, activations quantized on the fly), then lowered.

Falls back to torch, saying why: a stage whose token count depends on the image (a program fixes every shape), a
stage that is not float32, a weight-only scheme (XNNPACK has none: torch quantizes the stage), and any stage the
exporter, the quantizer or the lowering refuses. XNNPACK runs on its own thread pool.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from ablate.api import FlatStage, Runtime, RuntimeStage, StageFallback, first_line, hookimpl, tensors_of


class ExecuTorchRuntime(Runtime):
    """ExecuTorch: each stage lowered to the XNNPACK delegate and run from its .pte program (CPU)."""

    name = "executorch"
    extra = "executorch"
    requires = ("executorch",)

    def prepare(self, stage: RuntimeStage):
        if not stage.static:
            raise StageFallback(
                "its token count depends on the image, and an ExecuTorch program fixes every shape to this image's"
            )
        if stage.quantize not in (None, "int8-dynamic"):
            raise StageFallback(f"XNNPACK has no {stage.quantize}; its int8 is int8-dynamic")
        if stage.device.type != "cpu":
            raise StageFallback(f"this runtime runs on the CPU, and the run's device is {stage.device.type}")
        flat = FlatStage(stage)
        flat.require_float32("this runtime")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime as Loader

        folder = tempfile.TemporaryDirectory(prefix=f"ablate-executorch-{stage.name}-")
        path = Path(folder.name) / f"{stage.name}.pte"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(flat, tuple(flat.inputs))
                if stage.quantize is not None:
                    program = _int8_dynamic(program, flat.inputs)
                lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
            path.write_bytes(lowered.buffer)
            method = Loader.get().load_program(path).load_method("forward")
        except Exception as exc:  # noqa: BLE001 - any export or lowering failure: leave the stage to torch
            raise StageFallback(f"ExecuTorch cannot take it: {first_line(exc, with_type=True, width=160)}") from None
        if not any(note.startswith("runtime executorch") for note in self.notes):
            self.notes.insert(0, "runtime executorch: XNNPACK delegate on the CPU (its own thread pool).")
        if stage.quantize is not None:
            self.notes.append(
                f"executorch {stage.name}: int8-dynamic as XNNPACKQuantizer's (pt2e), int8 weights per output channel."
            )
        self.files[stage.name] = path
        self.weight_bytes[stage.name] = path.stat().st_size  # the program: its weights and a little structure
        self.graph_io[stage.name] = (list(flat.input_names), list(flat.output_names))

        def run(value, folder=folder):  # the default keeps the program's folder alive with the method
            given = [t.contiguous() for t in tensors_of(value)]  # its inputs must be dense (a transpose is not)
            return flat.rebuild(value, list(method.execute(given)))

        return run


def _int8_dynamic(program, inputs):
    """The exported stage quantized for XNNPACK: int8 weights per output channel, activations quantized on the fly.
    pt2e wants a calibration call between prepare and convert; with dynamic activations it fixes no scale."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    module = program.module()
    for node in list(module.graph.nodes):  # dtype assertions pt2e's calibration call trips on (a decoder's positions)
        if node.target == torch.ops.aten._assert_tensor_metadata.default:
            module.graph.erase_node(node)
    module.recompile()
    prepared = prepare_pt2e(module, XNNPACKQuantizer().set_global(config))
    prepared(*inputs)
    return torch.export.export(convert_pt2e(prepared), tuple(inputs))


@hookimpl
def register_runtimes(register):
    register(ExecuTorchRuntime)
