"""Does the toolkit's decode add overhead? Its decoding steps vs a hand-written transformers generation loop.

Both paths use the same VLM's language model (the same weights and dtype), the same prefill (vision stages and the
spliced prompt), transformers' DynamicCache and the same number of tokens, greedy, without stopping at EOS. In every
round each path prefills untimed, then its max_new_tokens - 1 decoding steps are timed as one span; the order
alternates between rounds. The script checks that both generate the same ids, then prints the per-round ratio
toolkit / hand (target 0.95-1.05).

    python benchmarks/decode_overhead.py --image-size 512 --max-new-tokens 32 --repeats 5
"""

from __future__ import annotations

import argparse
import inspect

import torch
from alternate import elapsed_ms
from report import paired_ratio, parse_args, timing, write_json

import ablate
from ablate.measurement.decoding import EagerDecoding


def hand_loop(lm, embeds: torch.Tensor, tokens: int):
    """A hand-written greedy loop as transformers' docs write one: prefill from the embeddings with the cache, then
    one token at a time with it. Returns a function that prefills and gives back the (untimed) steps to run."""
    cache_kwarg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def prepare():
        out = lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        state = {"ids": out.logits[:, -1].argmax(dim=-1, keepdim=True), "cache": getattr(out, cache_kwarg)}
        generated = [state["ids"]]

        def steps():
            for _ in range(tokens - 1):
                out = lm(input_ids=state["ids"], use_cache=True, **{cache_kwarg: state["cache"]})
                state["ids"] = out.logits[:, -1].argmax(dim=-1, keepdim=True)
                generated.append(state["ids"])
            return torch.cat(generated, dim=1)

        return steps

    return prepare


def toolkit_loop(vlm, ctx, tokens: int):
    """The toolkit's decode as `ablate run --max-new-tokens` times it in eager mode (decoding.EagerDecoding)."""

    def prepare():
        path = EagerDecoding(vlm)
        path.prefill(ctx)
        generated = [path.ids]

        def steps():
            for _ in range(tokens - 1):
                path.step()
                generated.append(path.ids)
            return torch.cat(generated, dim=1)

        return steps

    return prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fastvlm-0.5b")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--warmup", type=int, default=1)
    args = parse_args(parser, "decode_overhead", repeats=5)

    torch.manual_seed(0)
    overrides = [f"encoder.image_size={args.image_size}", f"run.dtype={args.dtype}"]
    vlm = ablate.build(args.preset, overrides, device=args.device).eval()
    with torch.inference_mode():
        pixels = torch.rand(1, 3, args.image_size, args.image_size, device=args.device)
        ids = vlm.make_prompt(args.prompt_tokens)
        ctx = vlm.run_vision(vlm.start(pixels, ids))
        embeds, _, _ = vlm.splice(ctx.tokens, ctx.input_ids, ctx.text_embeds)
        paths = {
            "hand": hand_loop(vlm.decoder.lm, embeds, args.max_new_tokens),
            "toolkit": toolkit_loop(vlm, ctx, args.max_new_tokens),
        }
        generated = {name: prepare()() for name, prepare in paths.items()}
        same = torch.equal(generated["hand"], generated["toolkit"])
        samples: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for round_index in range(args.warmup + args.repeats):
            for name in names if round_index % 2 == 0 else names[::-1]:
                steps = paths[name]()  # the prefill, untimed
                elapsed = elapsed_ms(steps, args.clock)
                if round_index >= args.warmup:
                    samples[name].append(elapsed / (args.max_new_tokens - 1))
    ratio = paired_ratio(samples["toolkit"], samples["hand"])
    row = {
        "same_ids": same,
        "hand_per_token": timing(samples["hand"]),
        "toolkit_per_token": timing(samples["toolkit"]),
        "toolkit_over_hand": ratio,
    }
    print(
        f"{args.preset} at {args.image_size} px, {args.dtype}, {args.max_new_tokens} tokens ({args.max_new_tokens - 1} "
        f"steps per round), DynamicCache, {torch.get_num_threads()} threads, {args.repeats} alternating rounds, "
        f"{args.clock} clock"
    )
    print(
        f"per token: hand {row['hand_per_token']['median_ms']:.2f} ms, toolkit "
        f"{row['toolkit_per_token']['median_ms']:.2f} ms; toolkit/hand {ratio['median']:.3f} (IQR {ratio['iqr']:.3f}, "
        f"range {ratio['min']:.3f}-{ratio['max']:.3f}) [target 0.95-1.05]; same ids: {same}",
        flush=True,
    )
    write_json(args.json, "decode_overhead", args, row)
    assert same, "the two loops generated different ids"


if __name__ == "__main__":
    main()
