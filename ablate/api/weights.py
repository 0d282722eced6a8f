"""Reading tensors from local files and loading them strictly, with errors that list what does not match; building
modules on the meta device without initialising values that do not exist."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ablate.api.errors import CheckpointError

SAFETENSORS = (".safetensors",)
PICKLED = (".bin", ".pt", ".pth")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a file, or of a directory's weight files (sharded checkpoints).

    Safetensors are read directly; .bin/.pt/.pth only with `weights_only=True` (never unpickle code). In a directory,
    HF's `model*.safetensors` shards when there are any (an `ablate train` checkpoint keeps its optimizer state in
    another safetensors file beside them), else every *.safetensors file, else HF's `pytorch_model*.bin` shards (not
    any pickle: optimizer states and training args live there too).
    """
    path = Path(path)
    if path.is_dir():
        files = (
            sorted(path.glob("model*.safetensors"))
            or sorted(path.glob("*.safetensors"))
            or sorted(path.glob("pytorch_model*.bin"))
        )
        if not files:
            raise CheckpointError(
                f"No *.safetensors (or pytorch_model*.bin) weight files in directory {path}. Point at the "
                f"checkpoint directory, or at the weights file itself."
            )
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(read_tensors(file))
        return tensors
    if not path.is_file():
        raise CheckpointError(f"Weights file {path} does not exist. Check the path (weights are never downloaded).")
    try:
        if path.suffix in SAFETENSORS:
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in PICKLED:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors.")
            return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}  # no 'epoch' etc.
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"Cannot read weights from {path}: {exc}") from None
    raise CheckpointError(f"Unknown weights format '{path.suffix}' for {path}: use .safetensors (or .bin/.pt/.pth).")


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
    return f"{len(items)} {title}: {shown}" if items else ""


def renamed_keys(tensors: dict[str, torch.Tensor], prefixes: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Tensors with each key's first matching (old, new) prefix replaced; keys no prefix matches stay as they are, so
    the strict load names them."""
    prefixes = tuple(prefixes)

    def rename(key: str) -> str:
        for old, new in prefixes:
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    return {rename(key): value for key, value in tensors.items()}


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """State-dict keys that name one tensor (tied weights, e.g. an LM head tied to the input embeddings)."""
    groups: dict[int, list[str]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _complete_tied(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """A tensor tied under several keys may be stored once, under any of them: give it every key. Tied keys stored
    with different values are an error: loading would keep one and silently drop the other."""
    state_dict = dict(state_dict)
    for keys in _tied_groups(module):
        stored = [key for key in keys if key in state_dict]
        if not stored:
            continue
        first = state_dict[stored[0]]
        for key in stored[1:]:
            value = state_dict[key]
            if value.shape == first.shape and not torch.equal(value, first):
                raise CheckpointError(
                    f"The weights for {what} hold different values for {stored[0]} and {key}, which the model as "
                    f"configured ties into one tensor (one would silently overwrite the other): build it with them "
                    f"untied, or load a checkpoint made for the tied model."
                )
        for key in keys:
            state_dict.setdefault(key, first)
    return state_dict


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load every tensor, or fail naming the missing, unexpected and mis-shaped keys (first few, with counts).

    A tied tensor (one parameter under several keys) may be stored under any one of its keys."""
    state_dict = _complete_tied(module, state_dict, what)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)} expected"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or misshaped:
        problems = "; ".join(
            p
            for p in (
                _listing("missing", missing),
                _listing("unexpected", unexpected),
                _listing("mis-shaped", misshaped),
            )
            if p
        )
        raise CheckpointError(
            f"The weights for {what} do not match its architecture: {problems}. Check that the checkpoint was "
            f"made for this configuration (sizes, layers, inference vs train form)."
        )
    module.load_state_dict(state_dict, strict=True)


# In-place operations that only change values (what weight initialisers run); on a meta tensor, which holds none,
# they are skipped. Ones that change shape or flags (resize_, requires_grad_, ...) are not in the list.
_VALUE_ONLY_IN_PLACE = frozenset(
    {"uniform_", "normal_", "trunc_normal_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_", "fill_", "zero_"}
    | {"copy_", "exp_", "sqrt_", "neg_", "bernoulli_", "random_", "exponential_", "log_", "abs_", "masked_fill_"}
)


class _SkipMetaValues(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _VALUE_ONLY_IN_PLACE and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the meta device (shapes only, nothing allocated) without running their weight
    initialisers, which on meta tensors compute nothing but cost time: a ViT-L builds in milliseconds, not a
    third of a second. Shapes, parameter counts and FLOPs are the same."""
    with torch.device("meta"), _SkipMetaValues():
        yield
