"""Runtimes: where a built VLM's stages run when they are timed (`run.runtime`).

The core's own runtime is `torch` (TORCH_RUNTIME): PyTorch, in one of the execution modes of `run.mode` (eager,
compile, cudagraph). It is the reference: every other runtime's outputs are compared with torch's eager ones, and a
stage another runtime cannot take runs there instead. A plugin adds a runtime by subclassing `Runtime` and
registering it with the `register_runtimes` hook:

    from ablate.api import Runtime, RuntimeStage, StageFallback, hookimpl

    class MyRuntime(Runtime):
        \"\"\"One line for `ablate plugins`.\"\"\"

        name = "my-runtime"
        extra = "my-runtime"              # pip install 'ablate-vlm[my-runtime]' installs what `requires` names
        requires = ("my_runtime_package",)

        def prepare(self, stage: RuntimeStage):
            ...                           # export, compile, load; raise StageFallback("why") if it cannot
            return run                    # a callable: the stage's input -> its output, as stage.run gives it

    @hookimpl
    def register_runtimes(register):
        register(MyRuntime)

A runtime sees one stage at a time (encoder, reducer, connector, prefill) with the input the eager run gave it on
this run's image and the eager output, so that it can trace or export on real shapes. What comes in and goes out is
a StageContext (the prefill returns logits): `tensors_of` lists a value's tensors in a fixed order and `with_tensors`
puts new ones in their place, which is what a runtime that runs graphs of plain tensors needs.
`ablate.api.testing.RuntimeConformance` checks a runtime's promises.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ablate.api.components import Attention, StageContext
from ablate.api.errors import ResourceError

TORCH_RUNTIME = "torch"  # the core's runtime: the reference, and where a stage that falls back runs


class StageFallback(Exception):  # noqa: N818 - not an error: a stage this runtime does not take
    """Raised by `Runtime.prepare`: this stage cannot run in this runtime; its message says why, in one sentence
    (e.g. "the reducer's token count depends on the image"). The stage then runs in torch, eagerly, and the record
    says why."""


@dataclass
class RuntimeStage:
    """One stage, as a runtime gets it to prepare."""

    name: str  # encoder, reducer, connector or prefill
    run: Callable[[Any], Any]  # the eager stage: input -> output (a StageContext; the prefill: logits)
    module: nn.Module  # the component it runs (its weights)
    example: Any  # its input on this run's image, as the eager run gave it
    output: Any  # the eager output on that input
    static: bool  # False: its output's shape is decided by the image (a data-dependent reducer)
    device: torch.device
    # run.quantize's scheme for its component (e.g. int8-dynamic), or None. A runtime applies its own int8 and
    # records the bytes in `Runtime.weight_bytes`, or raises StageFallback: torch then quantizes and runs the stage.
    quantize: str | None = None


class Runtime:
    """A place the stages run. Subclass it, set `name` (and `extra`, `requires`), implement `prepare`.

    One instance serves one run: `prepare` is called once per stage, in pipeline order, before anything is timed.
    """

    kind = "runtime"
    name: ClassVar[str] = ""
    extra: ClassVar[str | None] = None  # the optional dependency group of ablate-vlm that installs `requires`
    requires: ClassVar[tuple[str, ...]] = ()  # import names of the packages the runtime needs

    @classmethod
    def missing(cls) -> list[str]:
        """The packages of `requires` that cannot be imported here."""
        return [package for package in cls.requires if importlib.util.find_spec(package) is None]

    @classmethod
    def check(cls) -> None:
        """Raise ResourceError, naming the extra to install, when a required package is missing."""
        missing = cls.missing()
        if not missing:
            return
        install = f"pip install 'ablate-vlm[{cls.extra}]'" if cls.extra else f"pip install {' '.join(missing)}"
        raise ResourceError(
            f"Runtime '{cls.name}' (run.runtime) needs {', '.join(missing)}, which is not installed here: "
            f"`{install}`, or run in another runtime (run.runtime={TORCH_RUNTIME} is always there)."
        )

    def __init__(self, threads: int | None = None):
        self.threads = threads  # the CPU threads torch runs with: a runtime with its own pool should use as many
        self.notes: list[str] = []  # sentences for the record's notes (what the runtime chose, e.g. its provider)
        self.weight_bytes: dict[str, int] = {}  # stage name -> bytes of its weights as the runtime holds them
        self.files: dict[str, Path] = {}  # stage name -> the file it was loaded from (what `ablate export` copies)
        # stage name -> the names (`tensor_names`) of the tensors that file reads and writes, for the export manifest
        self.graph_io: dict[str, tuple[list[str], list[str]]] = {}

    def prepare(self, stage: RuntimeStage) -> Callable[[Any], Any]:
        """A callable that runs `stage` here: takes an input like `stage.example`, returns an output like
        `stage.output`. Raise StageFallback to leave this stage to torch."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ values as lists of tensors


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor a stage input or output holds, in a fixed order: a tensor is itself; a StageContext's fields in
    order (an Attention's queries then keys, a mapping's tensors by key)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, StageContext):
        found = []
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if isinstance(item, Attention):
                found += [item.queries, item.keys]
            elif isinstance(item, dict):
                found += [v for _, v in sorted(item.items()) if isinstance(v, torch.Tensor)]
            elif isinstance(item, torch.Tensor):
                found.append(item)
        return found
    return []


def tensor_names(value: Any) -> list[str]:
    """Names of `tensors_of(value)`, in the same order: the StageContext field (`attention.queries`, `extras.KEY`),
    or `logits` for a plain tensor (the prefill's output). A graph's inputs and outputs are named so."""
    if isinstance(value, torch.Tensor):
        return ["logits"]
    if not isinstance(value, StageContext):
        return []
    names = []
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if isinstance(item, Attention):
            names += [f"{f.name}.queries", f"{f.name}.keys"]
        elif isinstance(item, dict):
            names += [f"{f.name}.{k}" for k, v in sorted(item.items()) if isinstance(v, torch.Tensor)]
        elif isinstance(item, torch.Tensor):
            names.append(f.name)
    return names


def with_tensors(template: Any, tensors: list[torch.Tensor]) -> Any:
    """`template` with its tensors (in `tensors_of` order) replaced by `tensors`; everything else as it was."""
    if isinstance(template, torch.Tensor):
        (tensor,) = tensors
        return tensor
    if not isinstance(template, StageContext):
        return template
    supply = iter(tensors)
    changes = {}
    for f in dataclasses.fields(template):
        item = getattr(template, f.name)
        if isinstance(item, Attention):
            changes[f.name] = replace(item, queries=next(supply), keys=next(supply))
        elif isinstance(item, dict):
            changes[f.name] = {
                k: next(supply) if isinstance(v, torch.Tensor) else v for k, v in sorted(item.items())
            } | {k: v for k, v in item.items() if not isinstance(v, torch.Tensor)}
        elif isinstance(item, torch.Tensor):
            changes[f.name] = next(supply)
    leftover = next(supply, None)
    if leftover is not None:
        raise ValueError("more tensors than the template holds")
    return replace(template, **changes)


FLOAT32_GRAPH_DTYPES = (torch.float32, torch.int64, torch.int32, torch.bool)  # a float32 graph's tensors


class FlatStage(nn.Module):
    """A stage as a function of plain tensors, what a graph exporter takes (torch.onnx.export, openvino).

    `inputs` are the example's tensors (`tensors_of` order, named `input_names`); `forward(*inputs)` returns the
    output tensors the stage computes (named `output_names`), leaving out those it only passes on (the prompt ids
    through the encoder: a graph would copy them); `rebuild(value, results)` makes the stage's output from an input
    value and a graph's results, handing on what was passed on.
    """

    def __init__(self, stage: RuntimeStage):
        super().__init__()
        self.module = stage.module  # its weights belong to the exported graph
        self.stage = stage
        self.inputs = tensors_of(stage.example)
        self.input_names = tensor_names(stage.example)
        outputs = tensors_of(stage.output)
        self.passed = [next((j for j, t in enumerate(self.inputs) if t is o), None) for o in outputs]
        self.computed = [i for i, j in enumerate(self.passed) if j is None]
        # A graph's names are unique: an output named like an input (the tokens a connector maps) gets `_out`.
        names = [tensor_names(stage.output)[i] for i in self.computed]
        self.output_names = [f"{name}_out" if name in self.input_names else name for name in names]

    def require_float32(self, runtime: str) -> None:
        """Fall back (StageFallback) unless the stage's tensors and weights are what a float32 graph holds."""
        tensors = self.inputs + tensors_of(self.stage.output)
        odd = {str(t.dtype).removeprefix("torch.") for t in tensors if t.dtype not in FLOAT32_GRAPH_DTYPES}
        odd |= {str(p.dtype).removeprefix("torch.") for p in self.module.parameters()} - {"float32"}
        if odd:
            raise StageFallback(f"its tensors are {', '.join(sorted(odd))}, and {runtime} runs float32")

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = tensors_of(self.stage.run(with_tensors(self.stage.example, list(tensors))))
        return tuple(out[i] for i in self.computed)

    def rebuild(self, value: Any, results: list[torch.Tensor]) -> Any:
        given = tensors_of(value)
        supply = iter(results)
        out = [next(supply) if j is None else given[j] for j in self.passed]
        return with_tensors(self.stage.output, out)
