"""Building a VLM from a config: each component in its dtype on its device (or the meta device), checked to fit
together before anything heavy is built, then given the weights its config names."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ablate.api.components import TEXT, Connector, Decoder, TokenReducer, VisionEncoder
from ablate.api.errors import ConfigError, IncompatibleComponentsError, ResourceError
from ablate.api.hooks import KINDS
from ablate.api.registry import Registry, get_registry
from ablate.api.weights import meta_device
from ablate.config.checkpoint_folders import read_hf_config
from ablate.config.compose import VLMConfig, load_config
from ablate.config.run_options import DTYPES, parse_device
from ablate.model.image_size import fitted_size
from ablate.model.loading import load_weights
from ablate.model.vlm import VLM


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in the target dtype: a 7B model never exists in float32 first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check_device(name: str | torch.device) -> torch.device:
    """The torch device `name` if this machine has it; a ResourceError naming what is here otherwise."""
    device = parse_device(str(name))
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ResourceError(
                f"--device {name} (run.device) was asked for, but torch sees no CUDA GPU on this machine. Use "
                f"--device cpu, or run it where a GPU is (a grid's cells fail one by one, each with this message)."
            )
        if device.index is not None and device.index >= count:
            raise ResourceError(
                f"--device {name} was asked for, but this machine has {count} CUDA GPU(s): use cuda:0..cuda:{count - 1}."
            )
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ResourceError(f"--device {name} was asked for, but Apple's MPS is not available here. Use --device cpu.")
    return device


def check_compatible(
    encoder: VisionEncoder, reducer: TokenReducer, connector: Connector | None = None, decoder: Decoder | None = None
) -> None:
    """Fail before anything runs when the reducer needs what the encoder (or decoder) cannot give.

    The reducer's own check comes first: it can name its options (e.g. the token scores an encoder offers).
    """
    if connector is not None and decoder is not None:
        reducer.check_pipeline(encoder, connector, decoder)
    available = set(encoder.provides) | {TEXT}  # the VLM itself provides the prompt's embeddings
    missing = set(reducer.requires) - available
    if missing:
        raise IncompatibleComponentsError(
            f"Reducer '{reducer.name}' (reducer.name) needs {', '.join(sorted(missing))} from the encoder, but "
            f"encoder '{encoder.name}' (encoder.name) provides {', '.join(sorted(encoder.provides)) or 'nothing extra'}. "
            f"Pick an encoder that provides it (e.g. a ViT with a CLS token via encoder=timm), or a reducer "
            f"that does not need it (e.g. reducer=none)."
        )
    if reducer.needs_grid:
        layout = encoder.output_layout()
        if reducer.config.position == "after_connector" and connector is not None:
            layout = connector.output_layout(layout)
        if layout.grid is None:
            raise IncompatibleComponentsError(
                f"Reducer '{reducer.name}' needs its input tokens on one 2-D grid; encoder '{encoder.name}' at "
                f"{encoder.config.image_size} px gives {layout}. Use an encoder setting that gives one grid."
            )
    if decoder is not None and reducer.prunes_in_decoder and not decoder.prunes_in_prefill:
        raise IncompatibleComponentsError(
            f"Reducer '{reducer.name}' drops visual tokens inside the LLM's prefill, which decoder '{decoder.name}' "
            f"(decoder.name) does not support (Decoder.prefill_pruned). Pick a decoder that does or another reducer."
        )


def build(
    config: str | os.PathLike | VLMConfig | dict,
    overrides: Iterable[str] = (),
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    meta: bool = False,
    train: bool = False,
    registry: Registry | None = None,
) -> VLM:
    """Build a VLM from a resolved config (or a preset name, YAML path, checkpoint directory or dict, plus overrides).

    Each component is built in its dtype (`run.dtype`, `run.dtypes.KIND`, or `dtype` for all) and then gets the
    weights its config names, strictly; weights are random otherwise. `meta=True` builds on the meta device:
    shapes, parameter counts and FLOPs without allocating memory (7B configs on a laptop); no weights are loaded.
    `train=True` returns the model in train mode (dropout, gradients); the default is eval mode.
    """
    registry = registry or get_registry()
    config = load_config(config, overrides, registry)
    target = None if meta else check_device(device or config.run.device)  # before anything is allocated
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"Unknown dtype '{dtype}'. Choose one of: {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    dtypes = {kind: dtype or config.run.dtype_of(kind) for kind in KINDS}
    classes = {kind: registry.get(kind, getattr(config, kind).name) for kind in KINDS}

    def make(kind: str, *args) -> Any:
        component_config = getattr(config, kind)
        with registry.blame(kind, component_config.name, "building it"), default_dtype(dtypes[kind]):
            return classes[kind](component_config, *args)

    with meta_device() if meta else nullcontext():
        encoder = make("encoder")
        encoder.input_size = config.input_size
        with registry.blame("encoder", encoder.name, "choosing its image size"):
            size, size_note = fitted_size(encoder, config.input_size)
        if size is not None:  # the VLM's config is what runs; the record keeps the config as asked
            config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, image_size=size))
            encoder = make("encoder")
            encoder.input_size = config.input_size
        with registry.blame("encoder", encoder.name, "counting its tokens"):
            encoder.num_tokens()  # rejects an image size the encoder cannot take, before the big decoder is built
        reducer = make("reducer")
        decoder = make("decoder")
        connector = make("connector", encoder.width, decoder.hidden_size)
        check_compatible(encoder, reducer, connector, decoder)
        encoder.request(frozenset(reducer.requires) - {TEXT})
        vlm = VLM(config, encoder, reducer, connector, decoder)
    if size is not None:
        vlm.choices["encoder.image_size"] = size
        vlm.choice_notes.append(size_note)
    for kind in KINDS:
        for option, value in getattr(vlm, kind).choices().items():
            vlm.choices[f"{kind}.{option}"] = value
            asked = getattr(getattr(config, kind), option, None)
            vlm.choice_notes.append(f"{kind}.{option}={asked} ran as {value} ({kind} '{getattr(vlm, kind).name}').")
    if not meta:
        vlm.loaded_weights = load_weights(vlm, registry)
        vlm = vlm.to(target)
    return vlm.train(train)


def from_checkpoint(path: str | os.PathLike, overrides: Iterable[str] = (), **build_options) -> VLM:
    """Build the VLM a checkpoint directory describes and load every one of its tensors.

    `overrides` apply on top of the checkpoint's own config, e.g. ["encoder.image_size=512"] to run the released
    weights at another resolution; `build_options` are `build`'s (device, dtype).
    """
    read_hf_config(Path(path))  # a clear error when it is no checkpoint directory
    return build(path, overrides, **build_options)
