"""The result record, defined once: one typed object per run, the same from `ablate.measure`, `ablate run --json`,
a grid cell or a results-store row. Every field is always present (None when unknown), failed runs included.

Everything else derives from the dataclasses below, so nothing can drift: the JSON (`Record.to_dict`, schema
SCHEMA_VERSION), the README's field reference (`reference_markdown`, checked by a test), the W&B metric names
(`metrics`: every numeric field, its path joined with '/') and the results store's indexed columns (`columns`).
Each field's meaning is stated once, in its `doc`.

Schema 3 (from 2): `latency_ms.stage_sum` is now the sum of the four stage medians, as it was always described;
schema 2 stored the median of the per-repeat sums. Its spread (`latency_spread_ms.stage_sum`) is still the IQR of
the per-repeat sums. Every other key is unchanged. `migrate` turns a schema-2 record into a schema-3 one (the store
and `Record.from_dict` apply it to what they read).

Schema 4 (from 3): `peak_memory_mb` is the run's own peak above the process's memory when the run started (the
`memory` block says how and what baseline it left out); schema 3 stored the whole process's resident memory. New:
the `timing` block (repeats, why they stopped, busy share, flags) and `latency_min_ms`. `migrate` moves a schema-3
peak to `memory.process_peak_mb` (that is what it measured) and leaves `peak_memory_mb` unknown.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ablate.model.vlm import STAGES

SCHEMA_VERSION = 4


def doc(
    text: str, default: Any = None, *, factory: Any = None, metrics: bool = True, columns=None, same_as: str = ""
) -> Any:
    """A record field: its meaning, its default, whether its numbers are W&B metrics, the store columns taken from
    it ({column: path below this field, '' for the field itself}), and `same_as` another field with the same keys
    (the reference lists those once)."""
    metadata = {"doc": text, "metrics": metrics, "columns": columns or {}, "same_as": same_as}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------------ blocks


@dataclass
class Tokens:
    """Tokens out of each stage, for one image."""

    encoder: int | None = doc("out of the encoder")
    reducer: int | None = doc("out of the reducer")
    connector: int | None = doc("out of the connector")
    llm_input: int | None = doc("what the LLM reads in all: the visual tokens and the prompt's")


@dataclass
class LLMTokens:
    """The tokens the LLM's layers work on, for one image, counted one way for every reducer (in-LLM pruning
    included), so that equal budgets are equal by construction."""

    visual_per_layer: list[int] | None = doc(
        "visual tokens each LLM layer runs over, layer 0 first (all equal unless a reducer prunes inside the LLM)"
    )
    visual_layer_average: float | None = doc(
        "their mean over the layers: the count FastV, SparseVLM and DART report (the LLM's input for the others)"
    )
    kv_positions: int | None = doc(
        "token positions the KV cache holds after the prefill, visual and prompt, summed over the layers "
        "(its bytes: the kv_cache block)"
    )


@dataclass
class Params:
    """Parameters per component."""

    encoder: int | None = doc("the vision encoder's")
    reducer: int | None = doc("the token reducer's (most have none)")
    connector: int | None = doc("the connector's")
    decoder: int | None = doc("the LLM's")
    total: int | None = doc("the whole VLM's (tied tensors counted once)")


@dataclass
class Flops:
    """FLOPs per stage for the batch, counted on the meta device (attention included)."""

    encoder: int | None = doc("the encoder stage")
    reducer: int | None = doc("the reducer stage")
    connector: int | None = doc("the connector stage")
    prefill: int | None = doc("the LLM prefill over the visual and prompt tokens (in-LLM pruning included)")
    total: int | None = doc("the four stages (None if one is unknown)")


@dataclass
class Latency:
    """Milliseconds per stage (`latency_ms`: medians over the timed repeats; `latency_spread_ms`: their
    interquartile ranges; `latency_min_ms`: their minima)."""

    preprocess: float | None = doc("decoding, resizing and normalizing the image (not part of TTFT)")
    encoder: float | None = doc("the encoder stage")
    reducer: float | None = doc("the reducer stage")
    connector: float | None = doc("the connector stage")
    prefill: float | None = doc("the LLM prefill up to the first token's logits, KV cache written")
    stage_sum: float | None = doc(
        "the sum of the four stages (encoder + reducer + connector + prefill), each timed on its own; it should "
        "agree with `ttft` within 5% (else timing.flags says so)"
    )
    ttft: float | None = doc("time to first token, the four stages timed as one call in the same repeats")


@dataclass
class TimingFlag:
    """One thing in the timings a careful reader would distrust (README: "Timings you can trust")."""

    kind: str | None = doc("stage_sum, spread, busy or precision: stable, for filtering and tables")
    message: str | None = doc("one sentence: what was seen, against which threshold, and what to do")


@dataclass
class Timing:
    """How the timed repeats went: how many, why they stopped, how busy the machine was, and the flags."""

    repeats: int | None = doc("timed repeats taken (under run.precision: until the precision or the time budget)")
    stop: str | None = doc(
        "why the repeats stopped: 'repeats' (run.repeats done), 'precision reached' (run.precision) or 'time budget' "
        "(run.max_time_s spent first)"
    )
    seconds: float | None = doc("wall time of the timed repeats")
    precision: float | None = doc(
        "relative standard error of the TTFT median, 1.2533 x 1.4826 x MAD / sqrt(repeats) / median (normal "
        "approximation from the median absolute deviation)"
    )
    busy_share: float | None = doc(
        "share of the CPUs' time (those this process may run on) that other processes used during the timed "
        "repeats: /proc/stat's non-idle time minus this process's own (/proc/self/stat); None where unreadable"
    )
    load_average: float | None = doc("the 1-minute load average when the timed repeats ended")
    flags: list[TimingFlag] = doc("what a careful reader would distrust; empty when nothing", factory=list)


@dataclass
class Memory:
    """How `peak_memory_mb` was measured, and the baseline it excludes."""

    baseline_mb: float | None = doc(
        "the process's memory when the run started, left out of peak_memory_mb (CPU: resident set; GPU: allocated)"
    )
    process_peak_mb: float | None = doc("the process's peak during the run: baseline_mb + peak_memory_mb")
    method: str | None = doc("how both were measured, or why no peak was")


@dataclass
class Samples:
    """Milliseconds of one timed quantity over its samples."""

    median: float | None = doc("the median")
    p90: float | None = doc("the 90th percentile (inclusive method)")
    min: float | None = doc("the fastest sample")
    spread: float | None = doc("the interquartile range (p75 - p25)")
    samples: int | None = doc("how many samples")


@dataclass
class Decode:
    """With `run.max_new_tokens`: generation after the prefill with the KV cache, timed at a fixed length."""

    max_new_tokens: int | None = doc(
        "output tokens per request, always exactly this many: no stop at an end-of-sequence id, so cells compare"
    )
    steps: int | None = doc("decoding steps per generation: max_new_tokens - 1 (the first token is the prefill's)")
    cache: str | None = doc("the KV cache's type as the decoder keeps it (transformers: DynamicCache, StaticCache)")
    mode: str | None = doc(
        "how the prefill into the cache and the steps ran: eager, compile or cudagraph (execution.fallbacks says why "
        "when it is not the run's mode)"
    )
    static_length: int | None = doc(
        "compile and cudagraph: the static cache's length in tokens (prefill + steps); every step attends over all "
        "of it, the positions not yet written masked"
    )
    deviation_from_eager: float | None = doc(
        "compile and cudagraph: max relative deviation of the first step's logits from the eager loop's"
    )
    setup_s: float | None = doc("compile and cudagraph: seconds to compile or capture the prefill and the step")
    repeats: int | None = doc(
        "timed generations after run.warmup untimed ones; each repeat generates once as one call and once step by step"
    )
    per_token_ms: Samples = doc(
        "time per output token: one decoding step (the LLM on one new token with the cache, then the greedy pick), "
        "every step of every timed repeat",
        factory=Samples,
    )
    end_to_end_ms: Samples = doc(
        "the whole generation as one call: the vision stages, the prefill and every step; what one request of the "
        "batch waits for its answer",
        factory=Samples,
    )
    predicted_end_to_end_ms: float | None = doc(
        "latency_ms.ttft + steps x per_token_ms.median: what the split into prefill and decode predicts for "
        "end_to_end_ms.median"
    )
    prefill_share: float | None = doc(
        "latency_ms.ttft / end_to_end_ms.median: the share of the answer's time to its first token"
    )
    step_flops: int | None = doc(
        "FLOPs of one decoding step for the batch (torch.utils.flop_counter on a real step at the cache's end length)"
    )
    seconds: float | None = doc("wall time of the decode timing, warm-up included")


@dataclass
class Throughput:
    """Work per second for the whole batch (`batch_size` rows per call): the figures a batch-size sweep compares."""

    images_per_s: float | None = doc("batch_size / latency_ms.ttft: images through to their first token per second")
    output_tokens_per_s: float | None = doc(
        "batch_size x max_new_tokens / decode.end_to_end_ms.median (with run.max_new_tokens)"
    )
    decode_tokens_per_s: float | None = doc(
        "batch_size / decode.per_token_ms.median: tokens per second once the prefill is done"
    )
    request_latency_ms: float | None = doc(
        "what each request of the batch waits for: decode.end_to_end_ms.median with run.max_new_tokens, else TTFT"
    )


@dataclass
class KVCache:
    """The KV cache, computed exactly from the decoder's shape: per layer and token it holds a key and a value of
    kv_heads x head_dim numbers in the decoder's dtype."""

    dtype: str | None = doc("the decoder's dtype, that of the cache")
    layers: int | None = doc("the decoder's layers")
    kv_heads: int | None = doc("key/value heads per layer (fewer than the query heads under grouped-query attention)")
    head_dim: int | None = doc("channels per head")
    bytes_per_token: int | None = doc(
        "bytes one token of one row adds in every layer: 2 x layers x kv_heads x head_dim x the dtype's size"
    )
    tokens: int | None = doc(
        "tokens per row the cache holds at the end of generation: tokens.llm_input + max_new_tokens - 1 (the last "
        "token is never fed back; without run.max_new_tokens, the prefill's tokens.llm_input)"
    )
    pruned_layers: int | None = doc(
        "layers that hold fewer tokens, those after an in-LLM reducer's layer K (FastV); 0 without one"
    )
    pruned_layer_tokens: int | None = doc("tokens per row those layers hold at the end (None without pruning)")
    prefill_bytes: int | None = doc("for the batch, after the prefill (what the first token leaves behind)")
    bytes: int | None = doc("for the batch, at the end of generation (the prefill's when max_new_tokens is 0)")
    unpruned_bytes: int | None = doc("what `bytes` would be without in-LLM pruning (None without pruning)")
    measured_bytes: int | None = doc(
        "bytes of the cache's key and value tensors as allocated after the timed generation (the decoder's count); "
        "None without a timed decode"
    )


@dataclass
class ImageInfo:
    """The image the run measured."""

    source: str | None = doc("'synthetic' (seeded noise of the encoder's input size) or the file's absolute path")
    width: int | None = doc("pixels")
    height: int | None = doc("pixels")
    sha256: str | None = doc("of the file, for a real image")


@dataclass
class Environment:
    """Where the run ran."""

    device_name: str | None = doc("the GPU's name, or the CPU's model name")
    ablate: str | None = doc("ablate's version")
    plugins: dict[str, str | None] = doc("every loaded plugin's version", factory=dict)
    libraries: dict[str, str | None] = doc("the installed version of every library ablate depends on", factory=dict)
    python: str | None = doc("Python's version")
    platform: str | None = doc("the operating system (platform.platform())")
    cpu_count: int | None = doc("logical CPUs of the machine")


@dataclass
class Fidelity:
    """With `run.fidelity`: the reduced model's first token against the same model without its reducer stage."""

    top1_agreement: float | None = doc("share of rows whose most likely first token agrees")
    kl: float | None = doc("mean KL(full || reduced) of the first-token distributions, in nats")
    rows: int | None = doc("rows compared (the batch)")
    reference: str | None = doc("what it was compared with")


@dataclass
class Quantization:
    """With run.quantize: what was quantized, its stored bytes, and what it changed in the first token."""

    schemes: dict[str, str] | None = doc("the scheme per quantized component (run.quantize)")
    float_bytes: dict[str, int] | None = doc("per quantized component: its weights' bytes unquantized, as stored")
    quantized_bytes: dict[str, int] | None = doc("the same as they ran: quantized (by torch or by the runtime)")
    fidelity: Fidelity | None = doc("first-token agreement and KL against the same model unquantized")


@dataclass
class ModeChoice:
    """How stages run: the execution mode, each component's dtype, the encoder's memory format."""

    runtime: str | None = doc(
        "where the stages run: torch, a runtime plugin's name, or mixed (some fell back to torch)"
    )
    mode: str | None = doc("eager, compile, cudagraph, or mixed (some stages fell back)")
    dtypes: dict[str, str] | None = doc("dtype per component")
    memory_format: str | None = doc("contiguous or channels_last")


@dataclass
class CpuFeatures:
    """The CPU's instruction set, as torch dispatches to it."""

    isa: str | None = doc("torch's CPU capability (AVX2, AVX512, ...)")
    bf16: bool | None = doc("whether it computes in bfloat16 natively (AVX512-BF16 or AMX)")
    amx: bool | None = doc("whether it has AMX tiles")
    mkldnn_bf16: bool | None = doc("whether oneDNN reports bfloat16 support")


@dataclass
class Execution:
    """How the timed stages ran (`ablate.measurement.modes`)."""

    requested: ModeChoice | None = doc("what the run options asked for")
    used: ModeChoice = doc("what ran", factory=ModeChoice)
    stages: dict[str, str] | None = doc(
        "how each stage ran: eager, compile, cudagraph, the runtime's name, or no-op (nothing to run)"
    )
    runtimes: dict[str, str] | None = doc("the runtime each stage ran in: torch, or run.runtime's")
    prepare_s: dict[str, float] | None = doc("outside torch: seconds each stage took to prepare (export, load)")
    ttft: str | None = doc("how the one-call TTFT ran (one CUDA graph, or the stages in turn)")
    fallbacks: list[str] = doc("one sentence per thing that could not run as asked, and what ran instead", factory=list)
    timer: str | None = doc("perf_counter (CPU) or cuda-events")
    setup_s: float | None = doc("seconds spent compiling or capturing before timing")
    graph_breaks: dict[str, int] | None = doc("torch.compile graph breaks per stage")
    deviation_from_eager: dict[str, float | None] | None = doc(
        "per stage, max |output - eager output| / max |eager output|, accumulated along the path"
    )
    eager_ms: dict[str, float] | None = doc("GPU only: the eager median per stage and of TTFT, for launch-bound flags")
    cpu: CpuFeatures | None = doc("on a CPU: its instruction set and bfloat16 support")


@dataclass
class Peak:
    """The device's peak, against which floors are computed."""

    name: str | None = doc("the device")
    tflops: dict[str, float | None] | None = doc("dense TFLOP/s per dtype")
    bandwidth_gbs: float | None = doc("memory bandwidth in GB/s")
    source: str | None = doc("where the figures come from: the GPU table, a CPU estimate, or run.peak overrides")


@dataclass
class StageRoofline:
    """One stage (or TTFT) against the device's peak."""

    flops: int | None = doc("FLOPs of the stage")
    bytes: int | None = doc("the least bytes any implementation must move: weights read, input and output")
    bytes_unfused: int | None = doc("bytes every operator reads and writes when nothing is fused")
    dtype: str | None = doc("the dtype whose peak applies")
    peak_tflops: float | None = doc("that peak")
    intensity: float | None = doc("FLOPs per byte (of `bytes`)")
    floor_ms: float | None = doc("max(FLOPs / peak, bytes / bandwidth): no implementation is faster")
    bound: str | None = doc("compute or memory: which term sets the floor")
    measured_ms: float | None = doc("the stage's median latency")
    measured_over_floor: float | None = doc("measured_ms / floor_ms")
    eager_ms: float | None = doc("in cudagraph mode: the eager median of the same stage")
    launch_bound: bool | None = doc("eager_ms is at least `launch_bound_ratio` times the graph's time")


@dataclass
class Roofline:
    """Roofline figures per stage (`ablate.measurement.roofline`)."""

    peak: Peak | None = doc("the device's peak")
    launch_bound_ratio: float = doc("eager / graph time from which a stage is flagged launch-bound", 2.0)
    stages: dict[str, StageRoofline | None] = doc(
        "per stage (encoder, reducer, connector, prefill), for ttft, and with run.max_new_tokens for decode_step (the "
        "median step: the decoder's weights read once and the KV cache as the average step reads it)",
        factory=lambda: dict.fromkeys((*STAGES, "ttft")),
    )


@dataclass
class KernelRow:
    """One kernel (GPU) or operator (CPU) among a stage's most expensive."""

    name: str | None = doc("the kernel or operator")
    self_ms: float | None = doc("its own time in the profiled pass")
    calls: int | None = doc("how often it ran")
    share: float | None = doc("its share of the stage's profiled time")


@dataclass
class Profile:
    """With `run.profile`: the trace written and each stage's top kernels."""

    trace: str | None = doc("the Chrome-trace JSON file (Perfetto opens it)")
    top: dict[str, list[KernelRow]] = doc("per stage, the most expensive kernels", factory=dict)


@dataclass
class Accuracy:
    """For a trained model scored by `ablate eval`."""

    exact_match: float | None = doc("share of answers equal to an accepted one after light normalization")
    anls: float | None = doc("average normalized Levenshtein similarity (0 below 0.5)")
    n: int | None = doc("records scored")
    chance: float | None = doc("the chance level the data set states (meta.json), if any")
    split: str | None = doc("the evaluation file")
    data: str | None = doc("the data folder")
    split_sha256: str | None = doc("sha256 of the evaluation file's bytes: the same name with other records differs")
    limit: int | None = doc("the first N records scored (`--limit`); None for the whole file (or a limit beyond it)")
    model: str | None = doc("the model scored: its weights folder (a run folder or checkpoint), else the config's name")
    step: int | None = doc("the training step those weights are from (an `ablate train` folder), else None")
    skipped: int | None = doc("bad records skipped")
    max_new_tokens: int | None = doc("the longest answer generated")


@dataclass
class ErrorInfo:
    """Why a run failed."""

    type: str | None = doc("the error's class ('unexpected X' for a bug)")
    message: str | None = doc("one paragraph naming the problem and the fix")
    stage: str | None = doc("what the run was doing")
    plugin: str | None = doc("the plugin whose code raised, for an unexpected failure")
    log: str | None = doc("the file holding the full traceback, for an unexpected failure")


# ------------------------------------------------------------------------------------------------ the record


@dataclass
class Record:
    """One run."""

    schema_version: int = doc("the record's schema (this is 4)", SCHEMA_VERSION, metrics=False)
    name: str | None = doc("the config's name", columns={"name": ""})
    visual_tokens: int | None = doc(
        "tokens of one image as the LLM receives them (for a reducer that decides by the image, run without one: its upper "
        "bound; see count_basis)",
        columns={"visual_tokens": ""},
    )
    count_basis: str | None = doc(
        "where the token and FLOP counts come from: 'config' (exact, known before running), 'upper bound' (a reducer "
        "that decides by the image, run without one: at most that many tokens, FLOPs at that bound) or 'measured "
        "image' (the timed run's image)",
        metrics=False,
        columns={"count_basis": ""},
    )
    prompt_tokens: int | None = doc("text tokens of the prompt besides the image")
    batch_size: int | None = doc("images (and prompts) per call")
    tokens: Tokens = doc("tokens out of each stage, for one image", factory=Tokens)
    llm_tokens: LLMTokens = doc("the tokens the LLM's layers see, for one image", factory=LLMTokens)
    params: Params = doc("parameters per component", factory=Params)
    flops: Flops = doc("FLOPs per stage for the batch", factory=Flops)
    latency_ms: Latency = doc(
        "medians over the timed repeats, in ms; `stage_sum`: the sum of the stage medians",
        factory=Latency,
        columns={"ttft_ms": "ttft"},
    )
    latency_spread_ms: Latency = doc(
        "interquartile ranges (p75 - p25) of the same samples, in ms; `stage_sum`: of the per-repeat sums",
        factory=Latency,
        same_as="latency_ms",
    )
    latency_min_ms: Latency = doc(
        "the fastest sample of each, in ms; `stage_sum`: the sum of the stage minima",
        factory=Latency,
        same_as="latency_ms",
    )
    timing: Timing = doc("how the timed repeats went and what in them to distrust", factory=Timing)
    peak_memory_mb: float | None = doc(
        "what the run itself allocated at its peak, in MiB, above the process's memory when it started (GPU: "
        "allocated by torch; CPU: the resident set); None under count-only (nothing allocated); see `memory`"
    )
    memory: Memory = doc("how peak_memory_mb was measured, and the baseline it leaves out", factory=Memory)
    decode: Decode | None = doc("with run.max_new_tokens: generation after the prefill, timed per token and as a whole")
    throughput: Throughput = doc(
        "images and tokens per second for the batch, and the latency per request", factory=Throughput
    )
    kv_cache: KVCache | None = doc(
        "the KV cache's size, computed from the decoder's shape and, when decoding, measured"
    )
    encoder_form: str | None = doc("train or inference, for reparameterizable encoders (FastViT)")
    weights: list[str] = doc("what was loaded ('kind: path'); empty for random weights", factory=list)
    image: ImageInfo | None = doc("the image measured", metrics=False)
    run: dict[str, Any] | None = doc(
        "the run options as used (ablate.config.run_options.RunOptions; `threads` as torch set them, `dtypes` "
        "resolved per component)",
        metrics=False,
        columns={"device": "device", "mode": "mode", "runtime": "runtime"},
    )
    env: Environment | None = doc("where it ran", metrics=False)
    config: dict[str, Any] | None = doc("the resolved config, `run:` section included, as asked for", metrics=False)
    choices: dict[str, Any] = doc(
        "what ran where the config left the choice to ablate, `KIND.option: value` (`encoder.image_size` under "
        "`image_size_fit: nearest` or `target_tokens`, `reducer.score` under `auto`); `config` keeps what was asked",
        factory=dict,
        metrics=False,
    )
    fidelity: Fidelity | None = doc("with run.fidelity: first-token agreement and KL against no reduction")
    quantization: Quantization | None = doc("with run.quantize: bytes before and after, fidelity to float")
    execution: Execution = doc("how the timed stages ran", factory=Execution)
    roofline: Roofline = doc("each stage against the device's peak", factory=Roofline)
    profile: Profile | None = doc("with run.profile: the trace and the top kernels per stage", metrics=False)
    notes: list[str] = doc("what a reader must know about the figures", factory=list, metrics=False)
    accuracy: Accuracy | None = doc("for a trained model scored by `ablate eval`")
    error: ErrorInfo | None = doc(
        "why the run failed; None when it did not", metrics=False, columns={"error_type": "type"}
    )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: plain dicts, lists and numbers, in field order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """A record from its JSON form (schemas 2 and 3 are migrated first); unknown keys are left out."""
        return _build(cls, migrate(data))


# ------------------------------------------------------------------------------------------ derived views


def migrate(data: Mapping[str, Any]) -> dict[str, Any]:
    """A record's JSON form in the current schema (see the module docstring for what changed)."""
    data = dict(data)
    if data.get("schema_version") == 2:
        latency = dict(data.get("latency_ms") or {})
        parts = [latency.get(stage) for stage in STAGES]
        latency["stage_sum"] = sum(parts) if all(isinstance(p, (int, float)) for p in parts) else None
        data.update(latency_ms=latency, schema_version=3)
    if data.get("schema_version") == 3:
        # A schema-3 peak was the whole process's resident memory: keep it as that, not as the run's own peak.
        memory = dict(data.get("memory") or {})
        if data.get("peak_memory_mb") is not None:
            memory["process_peak_mb"] = data["peak_memory_mb"]
            memory["method"] = "schema 3: the process's peak resident memory, no baseline left out"
        data.update(peak_memory_mb=None, memory=memory, schema_version=4)
    return data


def _build(cls: type, data: Any) -> Any:
    if not isinstance(data, Mapping):
        return data
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name])
    return cls(**values)


def _value(hint: Any, value: Any) -> Any:
    """`value` (JSON) built as the type `hint` says: a record block, a dict or list of them, or as it is."""
    if value is None:
        return None
    for option in _options(hint):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            return _build(option, value)
        if origin is dict and len(args) == 2 and isinstance(value, Mapping):
            return {key: _value(args[1], item) for key, item in value.items()}
        if origin is list and args and isinstance(value, list):
            return [_value(args[0], item) for item in value]
    return value


def _inner(hint: Any) -> tuple[type | None, str]:
    """The record block a field's type holds, and how: (`Peak`, '') for `Peak | None`, (`StageRoofline`, '.STAGE')
    for a dict of them, (`KernelRow`, '.STAGE[]') for a dict of lists of them; (None, '') for plain values."""
    for option in _options(hint):
        if dataclasses.is_dataclass(option):
            return option, ""
        origin, args = typing.get_origin(option), typing.get_args(option)
        if origin is dict and len(args) == 2:
            block, suffix = _inner(args[1])
            if block is not None:
                return block, ".STAGE" + suffix
        if origin is list and args:
            block, suffix = _inner(args[0])
            if block is not None:
                return block, "[]" + suffix
    return None, ""


def _options(hint: Any) -> list[Any]:
    """The types a hint allows besides None: [A, B] for `A | B | None`, [A] for `A`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [option for option in typing.get_args(hint) if option is not type(None)]
    return [hint]


def _fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted path, field, type) of every field, depth first, each block before its own fields; a dict of blocks
    shows its keys (stages) as STAGE and a list of them as []."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        yield path, f, hints[f.name]
        block, suffix = _inner(hints[f.name])
        if block is not None:
            yield from _fields(block, f"{path}{suffix}.")


def value_at(record: Mapping[str, Any] | None, path: str) -> Any:
    """The value at a dotted path of a record's JSON form ('latency_ms.ttft'); None where any part is missing."""
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def flatten(tree: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def columns() -> dict[str, str]:
    """The results store's indexed columns: column name -> dotted path into the record."""
    found = {}
    for path, f, _ in _fields(Record):
        for column, below in f.metadata.get("columns", {}).items():
            found[column] = f"{path}.{below}" if below else path
    return found


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's numbers (its JSON form) under stable '/'-joined names (`latency_ms/ttft`,
    `roofline/stages/encoder/floor_ms`): every numeric value of a field marked as metrics, plus `status` ('ok' or
    'failed') and the error's fields."""
    out: dict[str, Any] = {}

    def walk(cls: type, data: Any, prefix: str) -> None:
        if not isinstance(data, Mapping):
            return
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("metrics", True):
                continue
            value, name = data.get(f.name), f"{prefix}{f.name}"
            block, suffix = _inner(hints[f.name])
            if block is not None and suffix == "":
                walk(block, value, name + "/")
            elif block is not None and suffix == ".STAGE" and isinstance(value, Mapping):
                for key, item in value.items():
                    walk(block, item, f"{name}/{key}/")
            elif isinstance(value, Mapping):  # numbers per stage, per dtype, ...
                out.update({f"{name}/{key}": item for key, item in value.items() if _numeric(item)})
            elif _numeric(value):
                out[name] = value

    walk(Record, record, "")
    error = record.get("error")
    out["status"] = "failed" if error else "ok"
    if isinstance(error, Mapping):
        out.update({f"error/{key}": value for key, value in error.items() if value is not None})
    return out


REFERENCE_START = "<!-- record reference: generated by `python -m ablate.measurement.record`; do not edit by hand -->"
REFERENCE_END = "<!-- end of the record reference -->"


def reference_markdown() -> str:
    """The README's field reference ("What a run reports"), generated from the definition."""
    lines = [REFERENCE_START, "", "| field | meaning |", "|---|---|"]
    listed_once = []
    for path, f, _ in _fields(Record):
        if any(path.startswith(prefix) for prefix in listed_once):
            continue
        meaning = f.metadata["doc"]
        if f.metadata["same_as"]:
            meaning += f"; the same keys as `{f.metadata['same_as']}`"
            listed_once.append(path + ".")
        lines.append(f"| `{path}` | {meaning.replace('|', '&#124;')} |")
    return "\n".join([*lines, "", REFERENCE_END]) + "\n"


if __name__ == "__main__":  # python -m ablate.measurement.record: the README section
    print(reference_markdown(), end="")
