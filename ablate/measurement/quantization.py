"""Quantization as an axis (`run.quantize.encoder/connector/decoder`), in the torch runtime.

int8-dynamic: every nn.Linear of the component is replaced by torch's dynamically quantized one (weights stored in
int8 with a per-tensor scale, activations quantized on the fly; torch.ao.quantization.quantize_dynamic). Convolutions,
norms and embeddings stay float32. A runtime plugin gets the scheme with each stage (RuntimeStage.quantize) and may
use its own int8 instead; a stage it leaves to torch is quantized here.

The record's `quantization` block gives each component's stored bytes before and after, and the first-token
fidelity against the same model unquantized (same weights, image and prompt).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ablate.measurement.record import Fidelity


def quantize(module: nn.Module, scheme: str) -> None:
    """Quantize `module` in place with `scheme` (one of run_options.QUANTIZATIONS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices: torchao is its successor
        torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)


def stored_bytes(module: nn.Module) -> int:
    """Bytes of the module's weights as stored: every tensor of its state dict, packed quantized weights included
    (a weight shared by two modules counts once)."""
    seen: set[int] = set()

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if value.is_quantized:
                return value.numel() * value.element_size()
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
        kl=kl.mean().item(),
        rows=int(reference.shape[0]),
        reference="the same model unquantized: same weights, image and prompt",
    )
