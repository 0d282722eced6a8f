"""How a config is trained: the `train:` section of a config, and its stages.

    train:
      template: chatml                  # chat template (ablate.train.data.templates): chatml, vicuna_v1, plain
      batch_size: 16
      stages:                           # run in order; each names a preset (experiments/stages/NAME.yaml) ...
        - stage1
        - {base: stage2, steps: 300, lr: {decoder: 1e-5}}   # ... or is a custom stage, optionally on top of one

A stage says which components learn (the others are frozen: no gradient, not in the optimizer), their learning
rates, the input resolution (`image_size`; None keeps encoder.image_size), the data file, and how long. Stage
presets follow FastVLM's recipe (Vasu et al., CVPR 2025, arXiv 2412.13303): stage1 trains the connector
only; stage1_5 (resolution scaling) and stage2 (instruction tuning) train everything.

This module holds the typed options and their checks; `ablate.config.compose` resolves stage presets (a stage
mapping's `base:` key) and `ablate.train.loop` runs the stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ablate.api.errors import ConfigError
from ablate.api.hooks import KINDS


@dataclass
class LearningRates:
    """Per-component learning rates; a component that trains needs one."""

    encoder: float | None = None
    reducer: float | None = None
    connector: float | None = None
    decoder: float | None = None  # the LLM


@dataclass
class StageConfig:
    name: str = "custom"
    train: list[str] = field(default_factory=lambda: ["connector"])  # components that learn; the rest are frozen
    lr: LearningRates = field(default_factory=LearningRates)
    image_size: int | None = None  # input resolution of this stage; None: the config's encoder.image_size
    data: str = "train.json"  # a LLaVA JSON file, relative to --data DIR (or absolute)
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int | None = None  # None: train.batch_size
    warmup: float = 0.03  # fraction of the steps with a linear warm-up
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # gradient clipping; None: off
    template: str | None = None  # None: train.template


@dataclass
class TrainOptions:
    """The `train:` config section."""

    stages: list[Any] = field(default_factory=lambda: ["stage1", "stage2"])
    template: str = "chatml"
    tokenizer: str | None = None  # a transformers tokenizer directory; None: DATA/tokenizer (as `ablate data synth`)
    image_folder: str | None = None  # None: each data file's folder
    batch_size: int = 16
    max_length: int = 2048  # tokens per conversation, image placeholder counted once; longer ones are cut
    seed: int = 0
    log_every: int = 10  # steps between metrics lines (metrics.jsonl, W&B)
    save_every: int = 100  # steps between checkpoints (and one at every stage's end)
    keep_checkpoints: int = 2  # the newest checkpoints kept
    skip_bad_records: bool = False  # drop and count malformed records and unreadable images instead of failing
    multiscale: bool = True  # M3: when the reducer has `all_scales`, train on the mean loss over every scale
    wandb: bool = False  # log to Weights & Biases (WANDB_MODE=offline works without an account)
    wandb_project: str = "ablate"


def check_train(options: TrainOptions) -> None:
    """Raise ConfigError, naming the key, for options that cannot train (stages are checked by `check_stage`)."""
    for name in ("batch_size", "max_length", "log_every", "save_every", "keep_checkpoints"):
        if getattr(options, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, not {getattr(options, name)}.")
    if not options.stages:
        raise ConfigError("train.stages is empty: give at least one stage, e.g. train.stages=[stage1].")


def check_stage(stage: StageConfig, key: str) -> None:
    unknown = [name for name in stage.train if name not in KINDS]
    if unknown:
        raise ConfigError(f"{key}.train names {unknown}: components are {', '.join(KINDS)}.")
    for name in stage.train:
        lr = getattr(stage.lr, name)
        if lr is None or not lr > 0:
            raise ConfigError(
                f"{key} trains the {name} but {key}.lr.{name} is {lr}: give it a positive learning rate, or drop "
                f"'{name}' from {key}.train to freeze it."
            )
    if stage.steps is not None and stage.steps < 1:
        raise ConfigError(f"{key}.steps must be at least 1 (or unset to use {key}.epochs), not {stage.steps}.")
    if stage.steps is None and not stage.epochs > 0:
        raise ConfigError(f"{key}.epochs must be positive, not {stage.epochs}.")
    if stage.batch_size is not None and stage.batch_size < 1:
        raise ConfigError(f"{key}.batch_size must be at least 1, not {stage.batch_size}.")
    if stage.image_size is not None and stage.image_size < 1:
        raise ConfigError(f"{key}.image_size must be positive (or unset), not {stage.image_size}.")
    if not 0 <= stage.warmup < 1:
        raise ConfigError(f"{key}.warmup is a fraction of the steps, in [0, 1), not {stage.warmup}.")
    if stage.max_grad_norm is not None and not stage.max_grad_norm > 0:
        raise ConfigError(f"{key}.max_grad_norm must be positive (or unset for no clipping).")
