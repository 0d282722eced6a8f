"""Fidelity without labels: how much a reducer changes what the model would say first.

The reduced model and the same model without its reducer stage (the identity, i.e. `reducer=none`: the same
weights, random or loaded, the same image and prompt) each give their first-token distribution; the record gets
the share of rows whose top-1 token agrees and the mean KL divergence KL(full || reduced) in nats. Meaningful with
real weights; computed for any (with random weights it measures how much the reducer perturbs the computation).
"""

from __future__ import annotations

import torch

from ablate.api.components import StageContext
from ablate.measurement.record import Fidelity


def first_token_fidelity(vlm, ctx: StageContext) -> Fidelity:
    """Compare `vlm` on `ctx` (a start context: pixels and prompt) with the same VLM skipping its reducer stage."""
    with torch.inference_mode():
        reduced = vlm.prefill_stage(vlm.run_vision(ctx)).float()
        full = ctx
        for name, stage in vlm.vision_stages():
            if name != "reducer":
                full = stage(full)
        reference = vlm.prefill_stage(full).float()
    log_p, log_q = torch.log_softmax(reference, dim=-1), torch.log_softmax(reduced, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    agree = reference.argmax(dim=-1) == reduced.argmax(dim=-1)
    return Fidelity(
        top1_agreement=agree.float().mean().item(),
        kl=kl.mean().item(),
        rows=int(reference.shape[0]),
        reference="the same model without its reducer stage (the identity): same weights, image and prompt",
    )
