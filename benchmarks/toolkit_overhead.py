"""Does the toolkit add overhead? FastVLM-0.5B TTFT by hand (timm + transformers) vs through `ablate`.

Both paths run the same weights on the same pixels and prompt, alternating in one process; the script checks
that they give the same logits, then prints medians and the ratio (target: toolkit / hand <= 1.03).

    python benchmarks/toolkit_overhead.py --image-size 512 --repeats 10
"""

from __future__ import annotations

import argparse
from statistics import median

import timm
import torch
from alternate import alternate
from torch import nn
from transformers import AutoModelForCausalLM

import ablate


def hand_written(vlm):
    """FastVLM-0.5B written directly against timm and transformers, holding the toolkit model's weights."""
    encoder = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, inference_mode=True)
    projector = nn.Sequential(nn.Linear(3072, 896), nn.GELU(), nn.Linear(896, 896))
    lm = AutoModelForCausalLM.from_config(vlm.decoder.lm.config, attn_implementation="sdpa")
    encoder.load_state_dict(vlm.encoder.model.state_dict())
    projector.load_state_dict(vlm.connector.layers.state_dict())
    lm.load_state_dict(vlm.decoder.lm.state_dict())
    encoder.eval(), projector.eval(), lm.eval()

    def ttft(pixels, input_ids):
        features = encoder.forward_features(pixels).flatten(2).transpose(1, 2)
        visual = projector(features)
        text = lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([visual, text[:, 1:]], dim=1)  # the image placeholder is the first id
        return lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits[:, -1]

    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    vlm = ablate.build("fastvlm-0.5b", [f"encoder.image_size={args.image_size}"])
    by_hand = hand_written(vlm)
    pixels = torch.rand(1, 3, args.image_size, args.image_size)
    input_ids = vlm.make_prompt(args.prompt_tokens)

    with torch.inference_mode():
        difference = (vlm.prefill(pixels, input_ids) - by_hand(pixels, input_ids)).abs().max().item()
        assert difference < 1e-4, f"the two paths disagree (max abs logit difference {difference})"
        samples = alternate(
            {"hand": lambda: by_hand(pixels, input_ids), "toolkit": lambda: vlm.prefill(pixels, input_ids)},
            repeats=args.repeats,
        )
    hand, toolkit = median(samples["hand"]), median(samples["toolkit"])
    fastest_hand, fastest_toolkit = min(samples["hand"]), min(samples["toolkit"])
    print(
        f"FastVLM-0.5B TTFT at {args.image_size} px, {vlm.num_visual_tokens()} visual + {args.prompt_tokens} "
        f"prompt tokens, {torch.get_num_threads()} threads, {args.repeats} alternating repeats"
    )
    print(f"  max abs logit difference: {difference:.2e}")
    print(f"  hand-written (timm + transformers): {hand:9.1f} ms median")
    print(f"  through ablate:                     {toolkit:9.1f} ms median")
    print(
        f"  ratio toolkit / hand: {toolkit / hand:.3f} of medians, {fastest_toolkit / fastest_hand:.3f} of minima"
        f"  (target <= 1.03)"
    )


if __name__ == "__main__":
    main()
