"""Tokenizers: a transformers tokenizer directory read from local files, or a small word-level one built for
generated data; and the one function that turns a rendered conversation into input ids and labels."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ablate.api.components import IGNORE_INDEX
from ablate.api.errors import DataError
from ablate.train.data.templates import IMAGE, ChatTemplate, Segment

# Special tokens of the generated tokenizer: what the chat templates need, plus unknown and padding.
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def load_tokenizer(path: str | Path):
    """A transformers tokenizer saved in `path` (tokenizer.json / tokenizer_config.json); never downloaded."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(
            f"Tokenizer directory {path} does not exist. Give a local transformers tokenizer directory "
            f"(train.tokenizer=PATH, saved with save_pretrained), or generate data with `ablate data synth`, which "
            f"writes one to DATA/tokenizer."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(
            f"Cannot read the tokenizer in {path}: {exc}. It must be a transformers tokenizer directory "
            f"(tokenizer.json or the files of a slow tokenizer, with tokenizer_config.json)."
        ) from None
    return tokenizer


def build_word_tokenizer(texts: Iterable[str], directory: Path):
    """A word-level tokenizer whose vocabulary is every word and punctuation mark in `texts`, saved to `directory`.

    Words split on whitespace and punctuation; `decode` joins tokens with spaces. Deterministic: the vocabulary is
    sorted, so the same texts give the same ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(text)} - set(SPECIAL_TOKENS))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def encode(
    tokenizer, template: ChatTemplate, segments: list[Segment], image_token_id: int
) -> tuple[list[int], list[int]]:
    """Input ids and labels of a rendered conversation: `<image>` becomes `image_token_id`; only target segments
    keep their ids as labels, the rest (system, questions, roles, the image) get IGNORE_INDEX."""
    ids: list[int] = []
    labels: list[int] = []
    if template.bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, target in segments:
        for index, piece in enumerate(text.split(IMAGE)):
            if index:
                ids.append(image_token_id)
                labels.append(IGNORE_INDEX)
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                labels.extend(piece_ids if target else [IGNORE_INDEX] * len(piece_ids))
    return ids, labels


def stop_token_id(tokenizer, template: ChatTemplate) -> int | None:
    """The id that ends an assistant turn (`<|im_end|>`, `</s>`), when the tokenizer has it as one token."""
    ids = tokenizer(template.stop, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else tokenizer.eos_token_id
