"""An lmms-eval model backed by an ablate model, so lmms-eval's benchmarks run on trained ablation variants.

    pip install lmms-eval        # optional; ablate does not depend on it
    python -m lmms_eval --model ablate --model_args pretrained=RUN_DIR,device=cpu --tasks textvqa_val

`pretrained` is anything `ablate eval` takes: a training run folder, one of its checkpoints, or a config with
trained `weights`; its chat template and tokenizer come from its `train:` section. The model registers with
lmms-eval through the `lmms_eval.models` entry point (lmms-eval >= 0.7 reads it) and with `register_model` (older
lmms-eval). It implements lmms-eval's simple-model API (`lmms_eval.api.model.lmms`):

* generate_until: greedy answers (sampling settings are ignored), cut at the task's `until` strings;
* loglikelihood: the log-probability of a continuation after the prompt, and whether greedy decoding gives it;
* generate_until_multi_round: not supported (one image and one question per request).

Each request must come with exactly one image: ablate's models take one image per prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from lmms_eval.models.registry_v2 import ModelManifest

from ablate.api.components import IGNORE_INDEX
from ablate.api.errors import ConfigError, DataError
from ablate.config.compose import load_config
from ablate.model.build import build
from ablate.train.data.templates import IMAGE, get_template
from ablate.train.data.tokenizer import load_tokenizer, stop_token_id
from ablate.train.evaluation import generate, prompt_ids

MODEL_ID = "ablate"


@register_model(MODEL_ID)
class AblateLMMS(lmms):
    """lmms-eval model arguments: pretrained (required), device, dtype, batch_size, max_new_tokens, template."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = "cpu",
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 32,
        template: str | None = None,
        **_ignored: Any,  # lmms-eval passes max_batch_size and the like
    ) -> None:
        super().__init__()
        run = {key: value for key, value in (("device", device), ("dtype", dtype)) if value}
        self.config = load_config(str(pretrained), run=run)
        if not self.config.train.tokenizer:
            raise ConfigError(f"{pretrained} names no tokenizer (train.tokenizer): give a trained ablate model folder.")
        self.tokenizer = load_tokenizer(self.config.train.tokenizer)
        self.template = get_template(template or self.config.train.stages[-1].template or self.config.train.template)
        self.vlm = build(self.config)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.stop_id = stop_token_id(self.tokenizer, self.template)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ------------------------------------------------------------------------------------------ helpers

    def _image(self, doc_to_visual, doc_id, task, split) -> torch.Tensor:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals if isinstance(visuals, list) else [visuals]) if v is not None]
        if len(visuals) != 1:
            raise DataError(
                f"Task {task} gives {len(visuals)} images for document {doc_id}; ablate models take exactly one image "
                f"per prompt."
            )
        return self.vlm.encoder.prepare(visuals[0].convert("RGB"))

    def _prompt(self, context: str) -> list[int]:
        question = context if IMAGE in context else f"{IMAGE}\n{context}"
        return prompt_ids(self.tokenizer, self.template, question, self.vlm.image_token_id)

    # ---------------------------------------------------------------------------------------- the API

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [request.args for request in requests[start : start + self.batch_size]]
            pixels = torch.stack([self._image(*args[2:6]) for args in chunk])
            prompts = [self._prompt(args[0]) for args in chunk]
            steps = max(int(args[1].get("max_new_tokens", self.max_new_tokens)) for args in chunk)
            for args, ids in zip(chunk, generate(self.vlm, pixels, prompts, self.stop_id, steps, self.pad_id)):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                until = args[1].get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                out.append(text.strip())
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            prompt = self._prompt(context)
            answer = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer], device=self.vlm.device)
            labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer], device=self.vlm.device)
            pixels = self._image(doc_to_visual, doc_id, task, split)[None].to(self.vlm.device)
            ctx = self.vlm.run_vision(self.vlm.start(pixels, ids))
            embeds, labels, _ = self.vlm.splice(ctx.tokens, ids, ctx.text_embeds, labels)
            logits = self.vlm.decoder(embeds, all_logits=True).logits[0, :-1].float()
            targets = labels[0, 1:]
            scored = targets != IGNORE_INDEX
            logprobs = torch.log_softmax(logits[scored], dim=-1)
            wanted = targets[scored]
            total = float(logprobs.gather(1, wanted[:, None]).sum())
            out.append((total, bool((logprobs.argmax(dim=-1) == wanted).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "ablate models answer one question per image; multi-round generation is not supported"
        )


# lmms-eval >= 0.7 reads this through the `lmms_eval.models` entry point.
MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{AblateLMMS.__name__}")
