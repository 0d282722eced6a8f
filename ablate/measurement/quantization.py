"""Quantization as an axis (`run.quantize.encoder/connector/decoder`), in the torch runtime.

Every scheme quantizes the component's nn.Linear weights; convolutions, norms and embeddings stay float32.

- int8-dynamic: torch's dynamically quantized Linear (int8 weights with a per-tensor scale, activations quantized
  on the fly; torch.ao.quantization.quantize_dynamic). Needs nothing beyond torch.
- int8-weight-only: torchao's Int8WeightOnlyConfig (int8 weights, a scale per output row; the matmul in float).
- int4-weight-only: int4 weights in groups of 64 input features, a scale and zero point per group (torchao's
  IntxWeightOnlyConfig). torchao 0.18's packed int4 layouts (Int4WeightOnlyConfig, two values a byte) run only on
  CUDA in bfloat16 or with the mslk kernels, so here each int4 value is stored in a byte of its own: the weights take
  about a quarter of float32, not an eighth (INT4_NOTE says so in the record). A Linear whose input width is not a
  multiple of 64 stays float32.

The torchao schemes need the `torchao` extra (`check_available`). A runtime plugin gets the scheme with each stage
(RuntimeStage.quantize) and may use its own int8 instead; a stage it leaves to torch is quantized here.

The record's `quantization` block gives each component's stored bytes before and after, and the first-token
fidelity against the same model unquantized (same weights, image and prompt).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
from torch import nn

from ablate.api.errors import ResourceError
from ablate.measurement.record import Fidelity

TORCHAO_SCHEMES = ("int8-weight-only", "int4-weight-only")  # the schemes torchao applies
INT4_GROUP = 64  # input features sharing an int4 scale and zero point
INT4_NOTE = (
    "int4-weight-only: torchao 0.18 packs int4 two values a byte only on CUDA (bfloat16) or with its mslk kernels, "
    "so the int4 values are stored one a byte here (IntxWeightOnlyConfig, groups of 64): the quantized weights "
    "take about a quarter of float32, not an eighth."
)


def check_available(schemes: dict[str, str]) -> None:
    """Raise ResourceError naming the extra when a scheme needs torchao and it is not installed."""
    wanting = [f"run.quantize.{kind}={scheme}" for kind, scheme in schemes.items() if scheme in TORCHAO_SCHEMES]
    if wanting and importlib.util.find_spec("torchao") is None:
        raise ResourceError(
            f"{', '.join(wanting)} quantizes through torchao, which is not installed here: `pip install "
            f"'ablate-vlm[torchao]'`, or use int8-dynamic (torch's own) instead."
        )


def notes(schemes: dict[str, str]) -> list[str]:
    """The record's sentences about how the schemes were stored here."""
    return [INT4_NOTE] if "int4-weight-only" in schemes.values() else []


def quantize(module: nn.Module, scheme: str) -> None:
    """Quantize `module` in place with `scheme` (one of run_options.QUANTIZATIONS)."""
    if scheme == "int8-dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices: torchao is its successor
            torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8-weight-only":
        quantize_(module, Int8WeightOnlyConfig())
    elif scheme == "int4-weight-only":
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))
        quantize_(module, config, filter_fn=lambda m, _: isinstance(m, nn.Linear) and m.in_features % INT4_GROUP == 0)
    else:
        raise ValueError(f"unknown quantization scheme {scheme!r}")


def stored_bytes(module: nn.Module) -> int:
    """Bytes of the module's weights as stored: every tensor of its state dict, packed quantized weights included
    (a weight shared by two modules counts once). A tensor subclass holding others (torchao's quantized weights:
    int8 data, scales, zero points) counts what it holds: its own dtype is the float it stands for."""
    seen: set[int] = set()

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if value.is_quantized:
                return value.numel() * value.element_size()
            if type(value) not in (torch.Tensor, nn.Parameter) and hasattr(value, "__tensor_flatten__"):
                inner, _ = value.__tensor_flatten__()
                return sum(size(getattr(value, name)) for name in inner)
            key = value.untyped_storage().data_ptr() if value.device.type != "meta" else id(value)
            if key in seen:
                return 0
            seen.add(key)
            return value.numel() * value.element_size()
        if isinstance(value, (tuple, list)):
            return sum(size(item) for item in value)
        return 0

    return sum(size(value) for value in module.state_dict().values())


def logits_fidelity(reference: torch.Tensor, quantized: torch.Tensor) -> Fidelity:
    """First-token agreement and KL(float || quantized) of two (B, vocab) logits."""
    log_p, log_q = torch.log_softmax(reference.float(), dim=-1), torch.log_softmax(quantized.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    agree = reference.argmax(dim=-1) == quantized.argmax(dim=-1)
    return Fidelity(
        top1_agreement=agree.float().mean().item(),
        kl=max(kl.mean().item(), 0.0),  # rounding can leave a hair below zero when the two barely differ
        rows=int(reference.shape[0]),
        reference="the same model unquantized: same weights, image and prompt",
    )
