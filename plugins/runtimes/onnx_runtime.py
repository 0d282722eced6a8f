"""ONNX Runtime (`run.runtime=onnxruntime`, extra `onnx`): each stage exported with torch's ONNX exporter on the
run's own shapes and run in an InferenceSession (CPU provider; CUDA when the device is a GPU and the installed
onnxruntime has it).

A stage is a function of a StageContext; the exported graph is a function of its tensors (`FlatStage`), and the
runner puts the session's outputs back where the eager output had them. Tensors a stage only passes on (the prompt
ids through the encoder) are not exported: the runner hands the input on, as eager does.

Falls back to torch, saying why: a stage whose token count depends on the image (an exported graph fixes every
shape, so it would keep this image's count for every image), a bfloat16 stage (numpy, the sessions' input, has no
bfloat16), and any stage the exporter or the session refuses.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch

from ablate.api import FlatStage, Runtime, RuntimeStage, StageFallback, first_line, hookimpl, tensors_of

EXPORTABLE = (torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool)


class OnnxRuntime(Runtime):
    """ONNX Runtime: each stage exported to ONNX and run in an InferenceSession (CPU; CUDA when present)."""

    name = "onnxruntime"
    extra = "onnx"
    requires = ("onnxruntime", "onnx", "onnxscript")

    def prepare(self, stage: RuntimeStage):
        import onnxruntime

        if not stage.static:
            raise StageFallback(
                "its token count depends on the image, and an exported graph fixes every shape to this image's"
            )
        flat = FlatStage(stage)
        tensors = flat.inputs + tensors_of(stage.output)
        odd = {str(t.dtype).removeprefix("torch.") for t in tensors if t.dtype not in EXPORTABLE}
        odd |= {str(p.dtype).removeprefix("torch.") for p in stage.module.parameters()} - {"float32"}
        if odd:
            raise StageFallback(f"its tensors are {', '.join(sorted(odd))}, and ONNX Runtime runs float32 here")
        # A folder per stage, kept as long as its session: graphs over 2 GB keep their weights in a side file.
        folder = tempfile.TemporaryDirectory(prefix=f"ablate-onnx-{stage.name}-")
        graph = Path(folder.name) / f"{stage.name}.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notices about constants: our shapes are fixed
                torch.onnx.export(
                    flat,
                    tuple(flat.inputs),
                    graph,
                    input_names=flat.input_names,
                    output_names=flat.output_names,
                    dynamo=True,
                    verbose=False,
                )
        except Exception as exc:  # noqa: BLE001 - any exporter failure: leave the stage to torch, saying why
            raise StageFallback(f"torch.onnx.export failed: {first_line(exc, with_type=True, width=160)}") from None
        if stage.quantize is not None:
            graph = self._quantized(graph, stage.quantize)
        self.weight_bytes[stage.name] = _initializer_bytes(graph)
        options = onnxruntime.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        providers = ["CPUExecutionProvider"]
        if stage.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = onnxruntime.InferenceSession(str(graph), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a graph the session cannot load: torch runs the stage
            raise StageFallback(f"ONNX Runtime cannot load the graph: {first_line(exc, width=160)}") from None
        used = session.get_providers()[0]
        if self.notes == []:
            self.notes.append(f"runtime onnxruntime {onnxruntime.__version__}: {used}, {self.threads} threads.")
        index = {name: i for i, name in enumerate(flat.input_names)}
        feeds = [(node.name, index[node.name]) for node in session.get_inputs()]  # the inputs the graph reads
        self.files[stage.name] = graph
        self.graph_io[stage.name] = ([name for name, _ in feeds], flat.output_names)
        device = stage.device

        def run(value, folder=folder):  # the default keeps the folder alive with the session
            given = tensors_of(value)
            results = session.run(None, {name: given[i].detach().cpu().numpy() for name, i in feeds})
            return flat.rebuild(value, [torch.from_numpy(result).to(device) for result in results])

        return run

    @staticmethod
    def _quantized(graph: Path, scheme: str) -> Path:
        """ONNX Runtime's own int8: dynamic quantization of the graph's weights, MatMul and Conv among them
        (activations quantized on the fly)."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        if scheme != "int8-dynamic":
            raise StageFallback(f"ONNX Runtime has no {scheme} here")
        target = graph.with_name(f"{graph.stem}-int8.onnx")
        logging.disable(logging.WARNING)  # its advice to pre-process the graph, on the root logger, for every stage
        try:
            quantize_dynamic(graph, target, weight_type=QuantType.QInt8, use_external_data_format=True)
        except Exception as exc:  # noqa: BLE001 - a graph its quantizer cannot take: torch quantizes the stage
            raise StageFallback(f"ONNX Runtime's quantize_dynamic failed: {first_line(exc, width=160)}") from None
        finally:
            logging.disable(logging.NOTSET)
        return target


def _initializer_bytes(graph: Path) -> int:
    """Bytes of the graph's weights (its initializers), wherever they are stored."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


@hookimpl
def register_runtimes(register):
    register(OnnxRuntime)
