"""Chat templates: a conversation -> text segments, each marked as a training target (assistant text) or not.

Rendering to segments rather than one string is what makes label masking exact: each segment is tokenized on its
own, and only the target segments keep their ids as labels (everything else gets IGNORE_INDEX). The image
placeholder `<image>` stays in the text; the tokenizing step replaces it with the model's image token id.

Templates follow the reference implementations (LLaVA's `conv_templates`):
  chatml     Qwen2 ChatML (FastVLM's `qwen_2`): <|im_start|>role\\n...<|im_end|>\\n, system "You are a helpful assistant."
  vicuna_v1  LLaVA-1.5 / Vicuna v1: "SYSTEM USER: ... ASSISTANT: answer</s>", BOS first
  plain      LLaVA's stage-1 captioning: "<image>" then the caption and "\\n", no roles
"""

from __future__ import annotations

from dataclasses import dataclass

from ablate.api.errors import ConfigError, did_you_mean

IMAGE = "<image>"
Segment = tuple[str, bool]  # (text, is_target)


@dataclass(frozen=True)
class ChatTemplate:
    """How one template lays out (question, answer) turns. `stop` ends every assistant turn (generation stops there)."""

    name: str
    system: str
    stop: str
    bos: bool = False  # start with the tokenizer's BOS token (Llama/Vicuna tokenizers)

    def segments(self, turns: list[tuple[str, str]]) -> list[Segment]:
        """The whole conversation: every answer (with its stop text) is a target, the rest is not."""
        out: list[Segment] = []
        for index, (question, answer) in enumerate(turns):
            out.append((self._before_answer(question, first=index == 0), False))
            out.append((self._answer(answer), True))
            if self._after_answer():
                out.append((self._after_answer(), False))
        return _merged(out)

    def prompt(self, question: str) -> str:
        """The text a model continues to answer `question` (the first turn, up to where the answer starts)."""
        return self._before_answer(question, first=True)

    # Each style fills these three.
    def _before_answer(self, question: str, first: bool) -> str:
        raise NotImplementedError

    def _answer(self, answer: str) -> str:
        return answer + self.stop

    def _after_answer(self) -> str:
        return ""


class ChatML(ChatTemplate):
    def _before_answer(self, question: str, first: bool) -> str:
        system = f"<|im_start|>system\n{self.system}<|im_end|>\n" if first else ""
        return f"{system}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def _after_answer(self) -> str:
        return "\n"


class Vicuna(ChatTemplate):
    def _before_answer(self, question: str, first: bool) -> str:
        return (f"{self.system} " if first else "") + f"USER: {question} ASSISTANT:"

    def _answer(self, answer: str) -> str:
        return f" {answer}{self.stop}"


class Plain(ChatTemplate):
    """Captioning: only the image (the question's text is dropped, as LLaVA's pretraining does)."""

    def _before_answer(self, question: str, first: bool) -> str:
        return IMAGE if IMAGE in question else ""

    def _answer(self, answer: str) -> str:
        return answer + self.stop


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatML("chatml", system="You are a helpful assistant.", stop="<|im_end|>"),
    "vicuna_v1": Vicuna(
        "vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.",
        stop="</s>",
        bos=True,
    ),
    "plain": Plain("plain", system="", stop="\n"),
}


def get_template(name: str, key: str = "train.template") -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(
            f"Unknown chat template '{name}' ({key}).{did_you_mean(name, TEMPLATES)} Templates: "
            f"{', '.join(TEMPLATES)} (chatml for Qwen2 / FastVLM, vicuna_v1 for LLaVA-1.5, plain for captioning)."
        )
    return TEMPLATES[name]


def _merged(segments: list[Segment]) -> list[Segment]:
    """Neighbouring segments of the same kind joined (fewer tokenizer calls, same text)."""
    out: list[Segment] = []
    for text, target in segments:
        if out and out[-1][1] == target:
            out[-1] = (out[-1][0] + text, target)
        elif text:
            out.append((text, target))
    return out
