"""How a config is run: the `run:` section of a config (`run.repeats=10`, or the `ablate run` flags).

Run options are config keys like any other, so a grid can sweep them and a record says exactly how it was made.
Precedence is the config's: defaults < preset < user file < overrides < command-line flags.

`RunOptions.validate` checks the values alone, when a config is resolved (anywhere: a login node expanding a grid
of GPU cells has no GPU). Whether this machine can run them (the device exists, the threads fit its cores, the
files exist) is checked where the run happens, by `ablate.measurement.machine.check_machine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ablate.api.errors import ConfigError
from ablate.api.runtimes import TORCH_RUNTIME

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# eager: plain PyTorch calls. compile: torch.compile per component. cudagraph: CUDA graphs of each stage and of the
# whole TTFT path, replayed (GPU only). See ablate/measurement/modes.py for what each does and how it falls back.
MODES = ("eager", "compile", "cudagraph")
# int8-dynamic: the Linear layers' weights stored in int8, activations quantized on the fly (torch's dynamic
# quantization in the torch runtime; a runtime plugin may use its own). int8-weight-only, int4-weight-only: the
# Linear weights in int8 or int4, the matmul in float (torchao, the `torchao` extra). See
# ablate/measurement/quantization.py.
QUANTIZATIONS = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
MEMORY_FORMATS = ("contiguous", "channels_last")  # channels_last applies to the encoder's convolutions
MAX_SEED = 2**32 - 1  # numpy's generators take seeds in [0, 2**32)
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass
class ComponentDtypes:
    """A dtype per component, overriding `run.dtype` for that one (e.g. a float32 encoder before a bfloat16 LLM)."""

    encoder: str | None = None
    reducer: str | None = None
    connector: str | None = None
    decoder: str | None = None


@dataclass
class ComponentQuantization:
    """A quantization scheme per component (None: as run.dtype says); the reducer has no weights worth it."""

    encoder: str | None = None
    connector: str | None = None
    decoder: str | None = None


@dataclass
class DevicePeak:
    """The device's peak, overriding ablate.measurement.roofline's table (GPUs) or estimate (CPUs) for the run's dtype."""

    tflops: float | None = None  # dense math peak in TFLOP/s
    bandwidth_gbs: float | None = None  # memory bandwidth in GB/s


@dataclass
class RunOptions:
    """The `run:` config section."""

    device: str = "cpu"  # cpu, cuda, cuda:N
    dtype: str = "float32"  # every component's dtype unless `dtypes` says otherwise
    dtypes: ComponentDtypes = field(default_factory=ComponentDtypes)
    # Where the stages run: torch (PyTorch in run.mode), or a runtime a plugin adds (`ablate plugins` lists them).
    runtime: str = TORCH_RUNTIME
    mode: str = "eager"
    quantize: ComponentQuantization = field(default_factory=ComponentQuantization)
    memory_format: str = "contiguous"
    profile: str | None = None  # a torch.profiler trace file to write ("auto": ablate-trace-NAME-MODE.json here)
    peak: DevicePeak = field(default_factory=DevicePeak)
    threads: int | None = None  # torch CPU threads; None: torch's choice
    warmup: int = 2  # untimed repeats first
    repeats: int = 5  # timed repeats; medians are reported
    # Repeats until the TTFT median's relative standard error is at most this (e.g. 0.01), run.repeats at least,
    # within run.max_time_s; None: exactly run.repeats. How it went is the record's `timing`.
    precision: float | None = None
    max_time_s: float | None = None  # the time budget of the timed repeats under run.precision (None: 60 s)
    max_spread: float = 0.2  # flag a TTFT whose interquartile range exceeds this fraction of its median
    count_only: bool = False  # tokens, params and FLOPs on the meta device; no weights allocated, nothing timed
    image: str | None = None  # a real image file; None: a synthetic image of the encoder's input size
    seed: int = 0  # random weights, the synthetic image and the prompt
    fidelity: bool = False  # also compare first-token logits with the model without its reducer (record["fidelity"])
    # A folder for the prepared stages' files and a manifest (`ablate export`): a runtime's graphs to carry elsewhere.
    export: str | None = None
    # Also generate exactly this many tokens with the KV cache (no stop at EOS) and time them (record["decode"]);
    # 0: time to first token only.
    max_new_tokens: int = 0

    def dtype_of(self, kind: str) -> torch.dtype:
        return DTYPES[getattr(self.dtypes, kind) or self.dtype]

    def validate(self) -> None:
        """Raise ConfigError naming the `run.` key (its command-line flag in brackets) for values that cannot run
        anywhere. Nothing here looks at this machine (see the module docstring)."""
        for key, value in [("dtype", self.dtype)] + [(f"dtypes.{k}", v) for k, v in vars(self.dtypes).items()]:
            if value is not None and value not in DTYPES:
                raise ConfigError(f"Unknown dtype '{value}' (run.{key}). Choose one of: {', '.join(DTYPES)}.")
        if self.mode not in MODES:
            raise ConfigError(f"Unknown mode '{self.mode}' (run.mode, --mode). Available modes: {', '.join(MODES)}.")
        if self.runtime != TORCH_RUNTIME and self.mode != "eager":
            raise ConfigError(
                f"run.mode={self.mode} is a mode of the {TORCH_RUNTIME} runtime; runtime '{self.runtime}' (run.runtime) "
                f"prepares the stages its own way. Drop run.mode (--mode), or use run.runtime={TORCH_RUNTIME}."
            )
        for kind, scheme in vars(self.quantize).items():
            if scheme is not None and scheme not in QUANTIZATIONS:
                raise ConfigError(
                    f"Unknown quantization '{scheme}' (run.quantize.{kind}). Choose one of: {', '.join(QUANTIZATIONS)}, "
                    f"or leave it unset for none."
                )
            if scheme is not None and self.dtype_of(kind) != torch.float32:
                raise ConfigError(
                    f"run.quantize.{kind}={scheme} quantizes float32 weights, but the {kind} runs in "
                    f"{str(self.dtype_of(kind)).removeprefix('torch.')}: set run.dtypes.{kind}=float32, or drop the "
                    f"quantization."
                )
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(
                f"Unknown memory format '{self.memory_format}' (run.memory_format, --memory-format). Choose one of: "
                f"{', '.join(MEMORY_FORMATS)}."
            )
        for key, value in vars(self.peak).items():
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ConfigError(
                    f"run.peak.{key} must be a positive number, not {value!r}. Leave it unset for the table."
                )
        if self.repeats < 1:
            raise ConfigError(f"run.repeats (--repeats) must be at least 1, not {self.repeats}.")
        if self.precision is not None and not (isinstance(self.precision, (int, float)) and 0 < self.precision < 1):
            raise ConfigError(
                f"run.precision (--precision) is the relative standard error of the TTFT median to reach, a number "
                f"between 0 and 1 such as 0.01 (1%), not {self.precision!r}. Leave it unset for exactly run.repeats."
            )
        if self.max_time_s is not None:
            if self.precision is None:
                raise ConfigError(
                    "run.max_time_s (--max-time-s) is the time budget of run.precision (--precision): set a precision "
                    "too, or drop the budget (without a precision exactly run.repeats repeats run)."
                )
            if not (isinstance(self.max_time_s, (int, float)) and 0 < self.max_time_s < float("inf")):
                raise ConfigError(
                    f"run.max_time_s (--max-time-s) must be a positive number of seconds, not {self.max_time_s!r}."
                )
        if not (isinstance(self.max_spread, (int, float)) and 0 < self.max_spread < float("inf")):
            raise ConfigError(
                f"run.max_spread (--max-spread) is the fraction of the TTFT median its interquartile range may reach "
                f"before the run is flagged, a positive number such as 0.2, not {self.max_spread!r}."
            )
        tokens = self.max_new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0 or tokens == 1:
            raise ConfigError(
                f"run.max_new_tokens (--max-new-tokens) is how many tokens to generate and time after the prefill: 0 "
                f"(time to first token only) or at least 2 (the first token is the prefill's), not {tokens!r}."
            )
        if self.warmup < 0:
            raise ConfigError(f"run.warmup (--warmup) must be 0 or more, not {self.warmup}.")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(
                f"run.threads (--threads) must be at least 1, not {self.threads}. Leave it unset for torch's default."
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"run.seed (--seed) must be between 0 and {MAX_SEED}, not {self.seed}.")
        if self.export is not None and self.runtime == TORCH_RUNTIME:
            raise ConfigError(
                f"run.export writes the files a runtime prepared, and the {TORCH_RUNTIME} runtime prepares none: name "
                f"one that does (run.runtime, --runtime; `ablate plugins` lists them)."
            )
        if self.export is not None and self.count_only:
            raise ConfigError("run.export (ablate export) writes prepared stages: drop --count-only (run.count_only).")
        if self.profile is not None and self.count_only:
            raise ConfigError("run.profile (--profile) profiles a timed run: drop --count-only (run.count_only).")
        device = parse_device(self.device)
        if device.type == "cpu" and torch.float16 in {self.dtype_of(k) for k in vars(self.dtypes)}:
            raise ConfigError(
                "float16 is for GPUs: on a CPU it is slow and some kernels lack it. Use run.dtype=bfloat16 (--dtype "
                "bfloat16) or float32 on the CPU."
            )


def parse_device(name: str) -> torch.device:
    """`name` as a torch device of a type ablate runs on; a ConfigError for a malformed or unsupported one. Whether
    this machine has it is `ablate.model.build.check_device`'s question."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"Unknown device '{name}' (run.device, --device). Use cpu, cuda or cuda:N.") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(
            f"Device type '{device.type}' (run.device, --device) is not supported. Use cpu, cuda or cuda:N."
        )
    if device.type == "cpu" and device.index not in (None, 0):
        raise ConfigError(f"Device '{name}' (run.device, --device): the CPU has no index; use --device cpu.")
    return device
