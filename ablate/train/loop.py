"""Staged training (`ablate train CONFIG --data DIR --out RUN_DIR`): plain PyTorch, one optimizer per stage.

Each stage (ablate.config.train_options) builds the model at its resolution (carrying the previous stage's weights),
freezes every component it does not train (requires_grad off, eval mode so normalization statistics stay put,
and left out of the optimizer), gives each trained component its own learning rate (AdamW, warm-up then cosine),
and runs its steps over a LLaVA-format data file. Checkpoints (ablate.train.run_dir) hold the model, the optimizer state and
the RNG state, so a killed run started again with the same command resumes from its newest checkpoint, and its
loss curve (metrics.jsonl) continues from that step.

When the reducer offers every nested scale at once (a config option `all_scales`, as Matryoshka's `matryoshka`
reducer has), training sets it and the loss is M3's: the mean of one LLM loss per scale, the stages after the
reducer run once per scale (M3, arXiv 2405.17430; its code: mu-cai/matryoshka-mm).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import ablate.train.run_dir as runs
from ablate.api.components import StageContext, TokenLayout, square_grid
from ablate.api.errors import ConfigError, DataError
from ablate.api.hooks import KINDS
from ablate.api.registry import Registry, get_registry
from ablate.api.saved_models import CONFIG_FILE, MODEL_FILE, read_meta, save_model
from ablate.config.compose import VLMConfig, load_config
from ablate.config.train_options import StageConfig
from ablate.model.build import build
from ablate.model.vlm import VLM
from ablate.train.data.llava import ConversationDataset, Example, read_examples
from ablate.train.data.templates import get_template
from ablate.train.data.tokenizer import load_tokenizer

SCALES = "matryoshka_scales"  # ctx.extras key: {token count: (B, count, C) tokens} for every nested scale
MULTISCALE_OPTION = "all_scales"  # a reducer config option that makes the reducer emit SCALES
# Progress callback: (stage name, step in stage, steps in stage, figures of the last step).
TrainProgress = Callable[[str, int, int, dict[str, float]], None]


# ------------------------------------------------------------------------------------------------ loss


def training_loss(
    vlm: VLM,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, float]]:
    """The loss of one batch, and the loss of each token scale when the reducer gives several (M3).

    With scales, the stages after the reducer (connector, LLM) run once per scale on that scale's tokens and the
    loss is the mean of the per-scale losses; otherwise this is `vlm(...).loss`.
    """
    ctx = vlm.start(pixel_values, input_ids)
    stages = vlm.vision_stages()
    for position, (name, stage) in enumerate(stages):
        ctx = stage(ctx)
        if name == "reducer" and SCALES in ctx.extras:
            losses = {
                count: _scale_loss(vlm, ctx, tokens, stages[position + 1 :], labels, attention_mask)
                for count, tokens in sorted(ctx.extras[SCALES].items())
            }
            loss = torch.stack(list(losses.values())).mean()
            return loss, {count: float(value.detach()) for count, value in losses.items()}
    return vlm.decode(ctx, labels=labels, attention_mask=attention_mask).loss, {}


def _scale_loss(vlm: VLM, ctx: StageContext, tokens: torch.Tensor, rest, labels, attention_mask) -> torch.Tensor:
    count = tokens.shape[1]
    grid = square_grid(count)
    layout = TokenLayout.grid_of(*grid) if grid else TokenLayout.unstructured(count)
    extras = {key: value for key, value in ctx.extras.items() if key != SCALES}
    scaled = replace(ctx, tokens=tokens, layout=replace(layout, image_size=ctx.layout.image_size), extras=extras)
    for _, stage in rest:
        scaled = stage(scaled)
    return vlm.decode(scaled, labels=labels, attention_mask=attention_mask).loss


# ------------------------------------------------------------------------------------------- freezing


def freeze(vlm: VLM, trained: Iterable[str]) -> None:
    """Components not in `trained`: no gradients, eval mode (frozen normalization statistics, no dropout)."""
    trained = set(trained)
    for kind in KINDS:
        component = getattr(vlm, kind)
        component.requires_grad_(kind in trained)
        component.train(kind in trained)


def make_optimizer(vlm: VLM, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over the trained components' parameters only, one group (and learning rate) per component."""
    groups = []
    for kind in stage.train:
        params = [p for p in getattr(vlm, kind).parameters() if p.requires_grad]
        if params:  # a parameter-free component (most reducers) trains nothing
            groups.append({"params": params, "lr": getattr(stage.lr, kind), "name": kind})
    if not groups:
        raise ConfigError(
            f"Stage '{stage.name}' trains {stage.train}, which have no parameters: train another component."
        )
    return torch.optim.AdamW(groups, weight_decay=stage.weight_decay)


def lr_factor(step: int, steps: int, stage: StageConfig) -> float:
    """Linear warm-up over `warmup` of the steps, then constant or cosine decay to 0 (LLaVA's schedule)."""
    warmup = math.ceil(stage.warmup * steps)
    if step < warmup:
        return (step + 1) / warmup
    if stage.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(size: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of step `step`: consecutive slices of one seeded permutation per epoch, so any step's batch is
    known without replaying the ones before it (resuming needs nothing but the step)."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position + len(out), size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.extend(order[offset : offset + batch_size - len(out)])
    return out


# ------------------------------------------------------------------------------------------- the loop


def stage_steps(stage: StageConfig, examples: int, batch_size: int) -> int:
    return stage.steps if stage.steps is not None else max(1, math.ceil(stage.epochs * examples / batch_size))


def build_for_stage(config: VLMConfig, stage: StageConfig, registry: Registry) -> VLM:
    """The train-mode model of one stage: its resolution, and every scale at once when the reducer offers it."""
    overrides = [f"encoder.image_size={stage.image_size}"] if stage.image_size else []
    if config.train.multiscale and MULTISCALE_OPTION in {f.name for f in dataclasses.fields(config.reducer)}:
        overrides.append(f"reducer.{MULTISCALE_OPTION}=true")
    return build(config, overrides, train=True, registry=registry)


def check_vocabulary(vlm: VLM, tokenizer, tokenizer_dir: Path) -> None:
    size = len(tokenizer)
    if size > vlm.decoder.vocab_size or vlm.image_token_id < size:
        raise ConfigError(
            f"The tokenizer in {tokenizer_dir} has {size} tokens, but the decoder's vocabulary has "
            f"{vlm.decoder.vocab_size} ids with the image placeholder at {vlm.image_token_id}: the ids would collide. "
            f"Set decoder.overrides.vocab_size={size + 1} or more (the image placeholder takes the last id)."
        )


def train(
    config: str | VLMConfig | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    data: str | Path,
    out: str | Path,
    progress: TrainProgress | None = None,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """Train every stage of `config.train` on the data folder `data`, writing the run to `out` (see
    ablate.train.run_dir).

    Resumes from the newest checkpoint in `out` when it holds the same run. Returns a summary: steps, final loss,
    wall time, examples skipped, where the model is.
    """
    registry = registry or get_registry()
    progress = progress or (lambda *_: None)
    config = load_config(config, overrides, registry)
    options, data, out = config.train, Path(data), Path(out)
    if not data.is_dir():
        raise DataError(f"--data {data} is not a folder. `ablate data synth --out {data}` generates a data folder.")
    tokenizer_dir = Path(options.tokenizer) if options.tokenizer else data / runs.TOKENIZER_DIR
    tokenizer = load_tokenizer(tokenizer_dir)
    identity = {"config": config.to_dict(), "data": str(data.resolve()), "tokenizer": str(tokenizer_dir.resolve())}
    identity["config"].pop("run")  # device and threads may change between a run and its resumption
    resume = runs.start_or_resume(out, identity)
    if not (out / runs.TOKENIZER_DIR).is_dir():
        shutil.copytree(tokenizer_dir, out / runs.TOKENIZER_DIR)
    if resume is not None:
        runs.truncate_metrics(out, resume.step)
    device = torch.device(config.run.device)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    logger = _Logger(out, config, options.wandb, resume is not None)
    started, step, carried, skipped_total, last = time.perf_counter(), 0, None, 0, {}
    examples_cache: dict[Path, tuple[list[Example], Any]] = {}
    try:
        for index, stage in enumerate(options.stages):
            batch_size = stage.batch_size or options.batch_size
            path = Path(stage.data) if Path(stage.data).is_absolute() else data / stage.data
            if path not in examples_cache:
                examples_cache[path] = read_examples(path, options.image_folder, options.skip_bad_records)
                skipped_total += examples_cache[path][1].count
            examples, _ = examples_cache[path]
            steps = stage_steps(stage, len(examples), batch_size)
            if resume is not None and index < resume.stage:
                step += steps  # done before the kill; the checkpoint holds its result
                continue
            torch.manual_seed(options.seed + index)
            vlm = build_for_stage(config, stage, registry).to(device)
            check_vocabulary(vlm, tokenizer, tokenizer_dir)
            if carried is not None:
                vlm.load_state_dict(carried)
            freeze(vlm, stage.train)
            optimizer = make_optimizer(vlm, stage)
            first = 0
            if resume is not None and index == resume.stage:
                runs.load_checkpoint(resume, vlm, optimizer)
                first, step = resume.stage_step, resume.step
            template = get_template(stage.template or options.template, f"train.stages.{index}.template")
            dataset = ConversationDataset(
                examples, tokenizer, template, vlm.image_token_id, vlm.encoder.prepare, options.max_length
            )
            bases = [getattr(stage.lr, group["name"]) for group in optimizer.param_groups]
            window: list[float] = []
            for stage_step in range(first, steps):
                tick = time.perf_counter()
                factor = lr_factor(stage_step, steps, stage)
                for group, base in zip(optimizer.param_groups, bases):
                    group["lr"] = base * factor
                rows = batch_indices(len(dataset), batch_size, stage_step, options.seed + index)
                batch = {k: v.to(device) for k, v in dataset.collate([dataset[i] for i in rows]).items()}
                loss, scale_losses = training_loss(vlm, **batch)
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"The loss became {float(loss)} at stage '{stage.name}' step {stage_step}: lower the learning "
                        f"rates (train.stages.{index}.lr) or raise the warm-up."
                    )
                loss.backward()
                if stage.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], stage.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seconds = time.perf_counter() - tick
                tokens = int(batch["attention_mask"].sum()) + len(rows) * (vlm.num_visual_tokens() or 0) - len(rows)
                last = {
                    "loss": float(loss.detach()),
                    "images_per_s": len(rows) / seconds,
                    "tokens_per_s": tokens / seconds,
                }
                window.append(last["loss"])
                progress(stage.name, stage_step + 1, steps, last)
                done = stage_step + 1 == steps
                if step % options.log_every == 0 or done:
                    logger.log(
                        {
                            "step": step,
                            "stage": stage.name,
                            "stage_step": stage_step + 1,
                            "loss": sum(window) / len(window),
                            "lr": {group["name"]: group["lr"] for group in optimizer.param_groups},
                            "images_per_s": last["images_per_s"],
                            "tokens_per_s": last["tokens_per_s"],
                            "elapsed_s": time.perf_counter() - started,
                            **({"scale_losses": scale_losses} if scale_losses else {}),
                        }
                    )
                    window = []
                if step % options.save_every == 0 or done:
                    position = {"stage": index, "stage_step": stage_step + 1, "step": step}
                    if done:  # a finished stage resumes at the next one
                        position = {"stage": index + 1, "stage_step": 0, "step": step}
                    runs.save_checkpoint(
                        out, vlm, optimizer, _model_config(config, stage), position, options.keep_checkpoints
                    )
            carried = vlm.state_dict()
        if carried is None:  # resumed after the last stage had finished: the newest checkpoint holds the model
            final = runs.list_checkpoints(out)[-1].directory
            shutil.copy2(final / MODEL_FILE, out / MODEL_FILE)
            shutil.copy2(final / CONFIG_FILE, out / CONFIG_FILE)
            meta = read_meta(out)
            meta["ablate_config"]["train"]["tokenizer"] = runs.TOKENIZER_DIR
            (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        else:
            save_model(out, vlm, _model_config(config, options.stages[-1]), str(out / runs.TOKENIZER_DIR))
        summary = {
            "run_dir": str(out.resolve()),
            "steps": step,
            "final_loss": last.get("loss"),
            "wall_s": time.perf_counter() - started,
            "resumed_from_step": resume.step if resume is not None else None,
            "skipped_records": skipped_total,
        }
        logger.finish(summary)
        return summary
    except BaseException:
        logger.finish(None)
        raise


def _model_config(config: VLMConfig, stage: StageConfig) -> dict[str, Any]:
    """The config of the model a stage leaves: the config at that stage's resolution, for its model directory."""
    out = config.to_dict()
    if stage.image_size:
        out["encoder"] = {**out["encoder"], "image_size": stage.image_size}
    return out


class _Logger:
    """metrics.jsonl lines, and W&B when enabled (its run resumes with the training run)."""

    def __init__(self, out: Path, config: VLMConfig, use_wandb: bool, resumed: bool):
        self.path = out / runs.METRICS_FILE
        self.wandb_run = None
        if use_wandb:
            import wandb

            run_file = out / "wandb_id"
            run_id = run_file.read_text().strip() if resumed and run_file.is_file() else secrets.token_hex(4)
            run_file.write_text(run_id)
            self.wandb_run = wandb.init(
                project=config.train.wandb_project,
                name=config.name,
                id=run_id,
                resume="allow",
                dir=str(out),
                config=config.to_dict(),
                job_type="train",
            )

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            flat = {f"train/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            flat.update({f"train/lr/{k}": v for k, v in row["lr"].items()})
            flat.update({f"train/loss_{k}_tokens": v for k, v in row.get("scale_losses", {}).items()})
            self.wandb_run.log(flat, step=row["step"])

    def finish(self, summary: dict[str, Any] | None) -> None:
        if self.wandb_run is not None:
            if summary is not None:
                self.wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
            self.wandb_run.finish(exit_code=0 if summary is not None else 1)
            self.wandb_run = None
