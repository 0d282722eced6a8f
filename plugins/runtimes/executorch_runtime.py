"""ExecuTorch (`run.runtime=executorch`, extra `executorch`): each stage exported with torch.export on the run's own
shapes, lowered to the XNNPACK delegate (what ExecuTorch runs on phone CPUs) and run from its .pte program by
ExecuTorch's runtime, on this CPU.

Falls back to torch, saying why: a stage whose token count depends on the image (a program fixes every shape), a
stage that is not float32, a quantized one (run.quantize: torch quantizes it; XNNPACK's int8 needs the pt2e flow,
not wired here), and any stage the exporter or the lowering refuses. XNNPACK runs on its own thread pool.
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
        if stage.quantize is not None:
            raise StageFallback(f"{stage.quantize} in ExecuTorch needs XNNPACK's pt2e quantization, not wired here")
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
                lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
            path.write_bytes(lowered.buffer)
            method = Loader.get().load_program(path).load_method("forward")
        except Exception as exc:  # noqa: BLE001 - any export or lowering failure: leave the stage to torch
            raise StageFallback(f"ExecuTorch cannot take it: {first_line(exc, with_type=True, width=160)}") from None
        if not self.notes:
            self.notes.append("runtime executorch: XNNPACK delegate on the CPU (its own thread pool).")
        self.files[stage.name] = path
        self.weight_bytes[stage.name] = path.stat().st_size  # the program: its weights and a little structure
        self.graph_io[stage.name] = (list(flat.input_names), list(flat.output_names))

        def run(value, folder=folder):  # the default keeps the program's folder alive with the method
            given = [t.contiguous() for t in tensors_of(value)]  # its inputs must be dense (a transpose is not)
            return flat.rebuild(value, list(method.execute(given)))

        return run


@hookimpl
def register_runtimes(register):
    register(ExecuTorchRuntime)
