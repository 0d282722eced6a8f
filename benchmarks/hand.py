"""FastVLM written by hand against timm and transformers (no ablate), holding a toolkit model's weights, in a mode.

This is the baseline the toolkit is measured against: what a careful engineer writes directly. In compile mode it
compiles its whole TTFT function at once (inductor freezing on the CPU, as the toolkit does); in cudagraph mode it
captures the whole TTFT in one CUDA graph.
"""

from __future__ import annotations

import copy

import timm
import torch
from torch import nn
from transformers import AutoModelForCausalLM

TIMM_NAMES = {"fastvithd": "fastvit_mci3", "fastvit-mci2": "fastvit_mci2", "fastvit-mci4": "fastvit_mci4"}


def hand_written(
    vlm,
    dtype: torch.dtype,
    memory_format: str,
    mode: str,
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    share: bool = False,
):
    """A no-argument TTFT callable (the image placeholder must be the prompt's first id, as VLM.make_prompt puts it).

    The timm and transformers modules are built here and load the toolkit model's weights; `share=True` uses the
    toolkit model's own timm and transformers modules instead (no second copy of the weights; eager float32 only,
    since converting them would change the toolkit model too)."""
    device = pixels.device
    if share:
        assert mode == "eager" and memory_format == "contiguous", "shared modules must stay as they are"
        encoder, projector, lm = vlm.encoder.model, vlm.connector.layers, vlm.decoder.lm
    else:
        if vlm.encoder.name in TIMM_NAMES:
            name = TIMM_NAMES[vlm.encoder.name]
            encoder = timm.create_model(name, pretrained=False, num_classes=0, inference_mode=True)
        else:  # a FastViT family member timm has no name for (the tiny preset's): a copy of its timm FastVit
            encoder = copy.deepcopy(vlm.encoder.model)
        width, hidden = vlm.connector.in_width, vlm.connector.out_width
        projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        lm = AutoModelForCausalLM.from_config(vlm.decoder.lm.config, attn_implementation="sdpa")
        encoder.load_state_dict(vlm.encoder.model.state_dict())
        projector.load_state_dict(vlm.connector.layers.state_dict())
        lm.load_state_dict(vlm.decoder.lm.state_dict())
    encoder, projector, lm = (m.to(device=device, dtype=dtype).eval() for m in (encoder, projector, lm))
    pixels = pixels.to(dtype)
    if memory_format == "channels_last":
        encoder = encoder.to(memory_format=torch.channels_last)
        pixels = pixels.contiguous(memory_format=torch.channels_last)

    def ttft(pixels, input_ids):
        features = encoder.forward_features(pixels).flatten(2).transpose(1, 2)
        visual = projector(features)
        text = lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([visual, text[:, 1:]], dim=1)
        return lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits[:, -1]

    if mode == "eager":
        return lambda: ttft(pixels, input_ids)
    if mode == "compile":
        compiled = torch.compile(ttft, dynamic=False)
        import torch._inductor.config as inductor_config

        with torch.inference_mode(), inductor_config.patch(freezing=device.type == "cpu"):
            compiled(pixels, input_ids)  # compiles now, with the settings
        return lambda: compiled(pixels, input_ids)
    if mode == "cudagraph":
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    ttft(pixels, input_ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = ttft(pixels, input_ids)

        def replay():
            graph.replay()
            return logits

        return replay
    raise ValueError(f"unknown mode {mode}")
