"""Conformance suites for component and runtime plugins: subclass one in your own tests.

    from ablate.api.testing import EncoderConformance
    from my_pkg import MyEncoder

    class TestMyEncoder(EncoderConformance):
        component = MyEncoder
        config_overrides = {"depth": 2}        # a tiny instance; default: the Config's defaults
        image_sizes = [64, 128]                # sizes it must take (default: the configured one)
        bad_image_sizes = [100]                # sizes it must refuse with ImageSizeError

Every test runs the real component on small random inputs (no mocks) and checks one promise of the interface in
`ablate.api`: declared token counts and widths equal the real ones, bad sizes fail with a helpful error,
dtype moves and meta-device builds work, gradients flow, rows of a batch do not leak into each other, and the
metadata that `ablate list` shows is present. The same classes run over every registered component in ablate's
own test suite, so a built-in and a third-party plugin are held to the same bar.

`RuntimeConformance` does the same for a runtime plugin (`runtime = MyRuntime`) on small real stages; see it.

Knobs every component suite has (class attributes): `component`, `config_overrides`, `real_forward` (False: only
shape checks on the meta device, for components too big for a unit test), `atol`/`rtol` (batch independence),
`dtype_tolerance` (float64 vs float32), `every_parameter_gets_grad`, `check_registration`. For anything a
dict cannot express, override the classmethod `make_component(**changes)`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from contextlib import nullcontext
from importlib import metadata
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ablate.api.components import (
    ATTENTION,
    CLS,
    IGNORE_INDEX,
    TEXT,
    Attention,
    Connector,
    ConnectorConfig,
    Decoder,
    DecoderConfig,
    DecoderOutput,
    EncoderConfig,
    ReducerConfig,
    StageContext,
    TokenLayout,
    TokenReducer,
    VisionEncoder,
    describe,
)
from ablate.api.errors import ImageSizeError
from ablate.api.hooks import ENTRY_POINT_GROUP
from ablate.api.preprocessing import Preprocessing
from ablate.api.registry import Registry

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # typed on command lines: encoder=NAME
MOVED_DTYPES = (torch.float64, torch.bfloat16)

__all__ = [
    "ConnectorConformance",
    "DecoderConformance",
    "EncoderConformance",
    "ReducerConformance",
    "RuntimeConformance",
    "SUITES",
    "suite_for",
]


# ------------------------------------------------------------------------------------------- helpers


def _tensor(out: Any) -> torch.Tensor:
    """The main tensor of a component's input or output: a context's tokens (or pixels), logits, or the tensor."""
    if isinstance(out, StageContext):
        return out.tokens if out.tokens is not None else out.pixel_values
    if isinstance(out, DecoderOutput):
        return out.logits
    return out


def _move(value: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move a tensor, or every tensor of a StageContext (or Attention); dtype changes only floating-point tensors."""
    if isinstance(value, (StageContext, Attention)):
        return dataclasses.replace(
            value,
            **{
                f.name: _move(getattr(value, f.name), device, dtype)
                for f in dataclasses.fields(value)
                if isinstance(getattr(value, f.name), (torch.Tensor, Attention))
            },
        )
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    return value


def _check_layout(component: nn.Module, out: StageContext) -> None:
    assert isinstance(out.layout, TokenLayout), f"{component.name}: ctx.layout must be a TokenLayout"
    assert out.layout.num_tokens == out.tokens.shape[1], (
        f"{component.name}: the layout accounts for {out.layout.num_tokens} tokens, but there are "
        f"{out.tokens.shape[1]} ({out.layout})"
    )


def _rows(make_row, batch: int, seed: int) -> torch.Tensor:
    """Stack rows made from seeds seed, seed+1, ...: row i of a batch equals the batch-1 input of seed+i."""
    return torch.cat([make_row(torch.Generator().manual_seed(seed + i)) for i in range(batch)])


# ------------------------------------------------------------------------------------------- base


class _Conformance:
    """Tests and knobs shared by every kind. Subclasses add `kind`, `base`, `config_base` and kind-specific tests."""

    kind: ClassVar[str]
    base: ClassVar[type[nn.Module]]
    config_base: ClassVar[type]

    component: ClassVar[type[nn.Module] | None] = None  # the class under test: set this
    config_overrides: ClassVar[dict[str, Any]] = {}  # on top of the Config's defaults, for a tiny instance
    real_forward: ClassVar[bool] = True  # False: forward only on the meta device (too big for a unit test)
    batch_size: ClassVar[int] = 2
    seed: ClassVar[int] = 0
    atol: ClassVar[float] = 1e-4  # batch independence
    rtol: ClassVar[float] = 1e-4
    dtype_tolerance: ClassVar[float] = 1e-3  # max |float64 - float32| relative to max |float32 output|
    every_parameter_gets_grad: ClassVar[bool] = False  # True: a trainable parameter without a gradient fails
    check_registration: ClassVar[bool] = True  # the component must be found through the `ablate` entry points

    # ------------------------------------------------------------------------------ building (overridable)

    @classmethod
    def make_config(cls, **changes: Any):
        """The component's Config from its defaults, `config_overrides` and `changes`, typed like a YAML config."""
        if cls.component is None:
            raise TypeError(f"{cls.__name__}: set the class attribute `component` to the class under test")
        values = {"name": cls.component.name, **cls.config_overrides, **changes}
        # Through OmegaConf, as `ablate.config` does: a YAML-typed value (e.g. 64 for a float) behaves the same.
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.component.Config), values))

    @classmethod
    def construct(cls, config) -> nn.Module:
        """Instantiate the component from a config the way `ablate.build` does."""
        return cls.component(config)

    @classmethod
    def make_component(cls, **changes: Any) -> nn.Module:
        """A fresh instance; `changes` override config values (e.g. image_size=64)."""
        return cls.construct(cls.make_config(**changes))

    def make_inputs(self, component: nn.Module, batch: int, seed: int) -> Any:
        """float32 CPU inputs for `component.forward`; row i must equal make_inputs(component, 1, seed + i)."""
        raise NotImplementedError

    def expected_shape(self, component: nn.Module, inputs: Any) -> tuple[int, ...] | None:
        """The main output's shape as the component declares it; None if it depends on the data."""
        raise NotImplementedError

    def check_output(self, component: nn.Module, inputs: Any, out: Any) -> None:
        """Kind-specific checks of one forward's output."""

    # ------------------------------------------------------------------------------ internal helpers

    def instance(self, meta: bool = False, **changes: Any) -> nn.Module:
        torch.manual_seed(self.seed)
        with torch.device("meta") if meta else nullcontext():
            component = self.make_component(**changes)
        return component.eval()  # the toolkit runs components in eval mode

    def require_real_forward(self) -> None:
        if not self.real_forward:
            pytest.skip(f"{self.component.name}: real forwards are off for this case (real_forward=False)")

    def forward(self, component: nn.Module, inputs: Any, grad: bool = False) -> Any:
        with nullcontext() if grad else torch.no_grad():
            return component(inputs)

    def run_checked(self, component: nn.Module, inputs: Any) -> torch.Tensor:
        """Forward, then the shape, kind-specific and (off meta) finiteness checks; returns the main tensor."""
        out = self.forward(component, inputs)
        self.check_output(component, inputs, out)
        tensor = _tensor(out)
        expected = self.expected_shape(component, inputs)
        if expected is not None:
            assert tuple(tensor.shape) == tuple(expected), (
                f"{component.name}: output shape {tuple(tensor.shape)} differs from the declared {tuple(expected)}"
            )
        if not tensor.is_meta:
            assert torch.isfinite(tensor.float()).all(), f"{component.name}: non-finite values in the output"
        return tensor

    # ------------------------------------------------------------------------------ shared tests

    def test_name_and_description(self):
        component = self.component
        assert issubclass(component, self.base), f"{component!r} must subclass ablate.api.{self.base.__name__}"
        name = getattr(component, "name", None)
        assert isinstance(name, str) and NAME_PATTERN.match(name), (
            f"{component.__name__}.name must be a non-empty string of letters, digits, '-', '_' or '.', not {name!r}"
        )
        description = describe(component)
        assert description, f"{component.__name__} needs a docstring: its first line is its `ablate list` description"
        assert len(description) <= 160, (
            f"{component.__name__}: keep the docstring's first line short ({len(description)} chars)"
        )

    def test_registered_under_its_name(self):
        """Its package's entry points load on their own, strictly, and register it under its name."""
        if not self.check_registration:
            pytest.skip("check_registration = False")
        module = self.component.__module__
        package = module.split(".")[0]
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        # The entry point naming its module (or a parent package); else any entry point of its top-level package.
        names = {ep.name for ep in entry_points if module == ep.module or module.startswith(ep.module + ".")} or {
            ep.name for ep in entry_points if ep.module.split(".")[0] == package
        }
        assert names, (
            f"no entry point of the '{ENTRY_POINT_GROUP}' group points into package '{package}': add "
            f'[project.entry-points.{ENTRY_POINT_GROUP}] my-plugin = "{self.component.__module__}" and reinstall'
        )
        registry = Registry()  # only this package's plugins: fast, and proves they need nothing else
        registry.load_entry_points(only=names, strict=True)
        assert registry.get(self.kind, self.component.name) is self.component

    def test_config_is_a_dataclass_whose_defaults_build(self):
        config_cls = self.component.Config
        assert dataclasses.is_dataclass(config_cls) and issubclass(config_cls, self.config_base), (
            f"{self.component.__name__}.Config must be a dataclass subclassing ablate.api.{self.config_base.__name__}"
        )
        OmegaConf.structured(config_cls)  # what `ablate.config` will do with it
        with torch.device("meta"):  # defaults may be full-size: build without allocating
            component = self.construct(config_cls(name=self.component.name))
        assert isinstance(component, self.component)

    def test_output_matches_declaration(self):
        self.require_real_forward()
        component = self.instance()
        tensor = self.run_checked(component, self.make_inputs(component, self.batch_size, self.seed))
        assert tensor.dtype == torch.float32, f"{component.name}: float32 in, {tensor.dtype} out"

    def test_meta_build(self):
        """Built under `torch.device("meta")` it allocates nothing and declares the same shapes (count-only runs)."""
        meta = self.instance(meta=True)
        on_cpu = [name for name, t in [*meta.named_parameters(), *meta.named_buffers()] if not t.is_meta]
        assert not on_cpu, f"{meta.name}: built under torch.device('meta') but these are not on meta: {on_cpu[:5]}"
        inputs = _move(self.make_inputs(meta, self.batch_size, self.seed), device="meta")
        if self.expected_shape(meta, inputs) is None:
            pytest.skip(f"{meta.name}: its output size depends on the data, which the meta device does not have")
        shape = self.run_checked(meta, inputs).shape
        if self.real_forward:
            real = self.instance()
            with torch.no_grad():
                real_shape = _tensor(real(self.make_inputs(real, self.batch_size, self.seed))).shape
            assert shape == real_shape, f"{meta.name}: meta output {tuple(shape)} vs real {tuple(real_shape)}"

    @pytest.mark.parametrize("dtype", MOVED_DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
    def test_dtype_move(self, dtype):
        self.require_real_forward()
        component = self.instance()
        inputs = self.make_inputs(component, self.batch_size, self.seed)
        with torch.no_grad():
            reference = _tensor(component(inputs))
        moved = self.run_checked(component.to(dtype), _move(inputs, dtype=dtype))
        assert moved.dtype == dtype, f"{component.name}: after .to({dtype}) the output is {moved.dtype}"
        if dtype == torch.float64:  # float64 must compute the same function, only more precisely
            error = (moved - reference.double()).abs().max().item()
            scale = reference.abs().max().item() or 1.0
            assert error <= self.dtype_tolerance * scale, (
                f"{component.name}: float64 and float32 outputs differ by {error:.3g} (scale {scale:.3g})"
            )

    def test_backward(self):
        """Gradients reach the input and the parameters, and all are finite (training and saliency need both)."""
        self.require_real_forward()
        component = self.instance().train()
        inputs = self.make_inputs(component, self.batch_size, self.seed)
        leaf = _tensor(inputs).requires_grad_(True)
        out = _tensor(self.forward(component, inputs, grad=True))
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # no symmetric cancellation
        (out.float() * weights).sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), f"{component.name}: no finite input gradient"
        assert leaf.grad.abs().sum() > 0, f"{component.name}: the output does not depend on the input"
        trainable = {name: p for name, p in component.named_parameters() if p.requires_grad}
        if not trainable:
            return
        bad = [name for name, p in trainable.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"{component.name}: non-finite gradients in {bad[:5]}"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), (
            f"{component.name}: no parameter got a non-zero gradient"
        )
        if self.every_parameter_gets_grad:
            missing = [name for name, p in trainable.items() if p.grad is None]
            assert not missing, f"{component.name}: trainable parameters without a gradient: {missing[:5]}"

    def test_batch_independence(self):
        """Row i of a batch equals the batch-1 output of input i: no batch statistics, no leaks between rows."""
        self.require_real_forward()
        component = self.instance()
        batch = self.make_inputs(component, 2, self.seed)
        if self.expected_shape(component, batch) is None:
            pytest.skip(f"{component.name}: an adaptive token count may be decided per batch")
        with torch.no_grad():
            together = _tensor(component(batch))
            for i in range(2):
                alone = _tensor(component(self.make_inputs(component, 1, self.seed + i)))
                torch.testing.assert_close(
                    together[i : i + 1],
                    alone,
                    atol=self.atol,
                    rtol=self.rtol,
                    msg=lambda m, i=i: f"{component.name}: row {i} of a batch-2 output differs from batch-1. {m}",
                )

    # ------------------------------------------------------------------------------ parametrization

    def pytest_generate_tests(self, metafunc):
        """Parametrize kind-specific fixtures (image sizes, grids, capabilities) from the subclass's attributes."""
        for fixture, values, ids in self.parameters():
            if fixture in metafunc.fixturenames:
                metafunc.parametrize(fixture, values, ids=ids)

    def parameters(self) -> list[tuple[str, list, Any]]:
        """(fixture name, values, ids) to parametrize; kinds add theirs."""
        return []


# ------------------------------------------------------------------------------------------- encoder


class EncoderConformance(_Conformance):
    """Checks a VisionEncoder. Set `component`, and `image_sizes` / `bad_image_sizes` for its size rules."""

    kind = "encoder"
    base = VisionEncoder
    config_base = EncoderConfig
    image_sizes: ClassVar[list[int]] = []  # sizes it must take; default: the configured size only
    bad_image_sizes: ClassVar[list[int]] = []  # sizes it must refuse with ImageSizeError

    def parameters(self):
        # None: the configured size / no bad size given (that test then skips, saying what to set).
        sizes, bad = list(self.image_sizes) or [None], list(self.bad_image_sizes) or [None]
        return super().parameters() + [
            ("capability", [CLS, ATTENTION], None),
            ("image_size", sizes, [str(s) if s else "configured" for s in sizes]),
            ("bad_image_size", bad, [str(s) if s else "unset" for s in bad]),
        ]

    def make_inputs(self, component, batch, seed):
        shape = component.input_shape(1)
        return StageContext(pixel_values=_rows(lambda g: torch.rand(*shape, generator=g), batch, seed))

    def expected_shape(self, component, inputs):
        # Inputs are made at the configured input size (input_shape), whose token count output_layout declares.
        return (inputs.pixel_values.shape[0], component.output_layout().num_tokens, component.width)

    def check_output(self, component, inputs, out):
        assert isinstance(out, StageContext), (
            f"{component.name}: forward must return a StageContext (dataclasses.replace(ctx, tokens=...)), not "
            f"{type(out).__name__}"
        )
        tokens = out.tokens
        assert isinstance(tokens, torch.Tensor) and tokens.ndim == 3, f"{component.name}: tokens must be (B, N, C)"
        assert isinstance(component.width, int) and component.width > 0, f"{component.name}: set self.width in __init__"
        batch = inputs.pixel_values.shape[0]
        assert tokens.shape[0] == batch, f"{component.name}: {batch} images, {tokens.shape[0]} rows"
        assert tokens.shape[2] == component.width, (
            f"{component.name}: tokens are {tokens.shape[2]} wide but the encoder declares width={component.width}"
        )
        _check_layout(component, out)
        if out.attention is not None:
            q, k = out.attention.queries, out.attention.keys
            assert q.ndim == 4 and q.shape == k.shape and q.shape[0] == batch, (
                f"{component.name}: attention queries and keys must be (B, heads, T, head_dim), got {tuple(q.shape)}"
            )
            # Reducers index attention over the visual tokens after the prefix ones: the counts must line up.
            prefix = out.attention.num_prefix_tokens
            assert q.shape[2] == prefix + tokens.shape[1], (
                f"{component.name}: attention over {q.shape[2]} tokens, but {prefix} prefix + {tokens.shape[1]} visual"
            )

    def test_declared_tokens_per_size(self, image_size):
        """`num_tokens(size)` and `output_layout()` equal the real output at every supported size."""
        changes = {"image_size": image_size} if image_size else {}
        component = self.instance(meta=not self.real_forward, **changes)
        size = component.config.image_size
        assert component.num_tokens() == component.num_tokens(size), f"{component.name}: num_tokens() vs ({size})"
        inputs = self.make_inputs(component, 1, self.seed)
        inputs = _move(inputs, device="meta") if not self.real_forward else inputs
        self.run_checked(component, inputs)
        with torch.no_grad():
            out = component(inputs)
        declared = dataclasses.replace(component.output_layout(), image_size=None)
        assert declared == dataclasses.replace(out.layout, image_size=None), (
            f"{component.name}: output_layout() declares {component.output_layout()}, forward gives {out.layout}"
        )
        assert component.preprocessing.image_size == size

    def test_bad_image_size_is_refused(self, bad_image_size):
        if bad_image_size is None:
            pytest.skip("set bad_image_sizes to sizes the encoder must refuse")
        with pytest.raises(ImageSizeError) as info:  # at build time: ablate.build calls num_tokens() first thing
            self.instance(meta=True, image_size=bad_image_size).num_tokens()
        assert str(bad_image_size) in str(info.value), f"the error should name the size {bad_image_size}: {info.value}"

    def test_preprocessing(self):
        component = self.instance(meta=True)
        prep = component.preprocessing
        assert isinstance(prep, Preprocessing), f"{component.name}.preprocessing must be a components.Preprocessing"
        assert prep.image_size == component.config.image_size
        assert len(prep.mean) == 3 and len(prep.std) == 3 and all(s > 0 for s in prep.std)
        hints = typing.get_type_hints(Preprocessing)
        for field in ("resize", "interpolation"):
            allowed = typing.get_args(hints[field])
            assert getattr(prep, field) in allowed, f"{component.name}: preprocessing.{field} must be one of {allowed}"

    def test_prepare_gives_the_input_shape(self):
        """`prepare` (a PIL image -> pixel_values of one image) matches `input_shape`."""
        from PIL import Image

        component = self.instance(meta=True)
        pixels = component.prepare(Image.new("RGB", (37, 23), (200, 100, 50)))
        assert tuple(pixels.shape) == tuple(component.input_shape(1))[1:], (
            f"{component.name}: prepare() gives {tuple(pixels.shape)}, input_shape(1) says {component.input_shape(1)}"
        )

    def test_capability(self, capability):
        """Declared extras arrive after request(); undeclared ones are refused (meta when real_forward is off)."""
        component = self.instance(meta=not self.real_forward)
        if capability not in component.provides:
            with pytest.raises(ValueError):
                component.request(frozenset({capability}))
            return
        component.request(frozenset({capability}))
        inputs = self.make_inputs(component, self.batch_size, self.seed)
        out = self.forward(component, _move(inputs, device="meta") if not self.real_forward else inputs)
        self.check_output(component, inputs, out)
        if capability == CLS:
            assert out.cls is not None and out.cls.shape == (self.batch_size, component.width), (
                f"{component.name}: cls must be (B, width) = {(self.batch_size, component.width)} after request({{CLS}})"
            )
        if capability == ATTENTION:
            assert out.attention is not None, f"{component.name}: no ctx.attention after request({{ATTENTION}})"

    def test_plugin_defined_extras_arrive(self):
        """Extras beyond CLS and ATTENTION that the encoder provides come in ctx.extras under their names."""
        component = self.instance(meta=not self.real_forward)
        own = sorted(set(component.provides) - {CLS, ATTENTION, TEXT})
        if not own:
            pytest.skip(f"{component.name} provides no plugin-defined extras")
        component.request(frozenset(own))
        inputs = self.make_inputs(component, self.batch_size, self.seed)
        out = self.forward(component, _move(inputs, device="meta") if not self.real_forward else inputs)
        missing = [name for name in own if name not in out.extras]
        assert not missing, f"{component.name}: requested extras missing from ctx.extras: {missing}"


# ------------------------------------------------------------------------------------------- reducer


class ReducerConformance(_Conformance):
    """Checks a TokenReducer on synthetic encoder outputs (a 4x4 grid, with CLS, attention and text when required)."""

    kind = "reducer"
    base = TokenReducer
    config_base = ReducerConfig
    grid: ClassVar[tuple[int, int]] = (4, 4)
    width: ClassVar[int] = 16
    heads: ClassVar[int] = 2
    head_dim: ClassVar[int] = 4
    text_length: ClassVar[int] = 5
    every_parameter_gets_grad = True

    def make_inputs(self, component, batch, seed, extras=None):
        """A StageContext with the extras the reducer requires (or `extras`); attention has one CLS-like prefix."""
        extras = component.requires if extras is None else extras
        n, c = self.grid[0] * self.grid[1], self.width
        values: dict[str, Any] = {
            "tokens": _rows(lambda g: torch.randn(1, n, c, generator=g), batch, seed),
            "layout": TokenLayout.grid_of(*self.grid),
        }
        if CLS in extras:
            values["cls"] = _rows(lambda g: torch.randn(1, c, generator=g), batch, seed + 100)
        if ATTENTION in extras:
            shape = (1, self.heads, 1 + n, self.head_dim)
            values["attention"] = Attention(
                queries=_rows(lambda g: torch.randn(*shape, generator=g), batch, seed + 200),
                keys=_rows(lambda g: torch.randn(*shape, generator=g), batch, seed + 300),
                num_prefix_tokens=1,
            )
        if TEXT in extras:
            values["text_embeds"] = _rows(lambda g: torch.randn(1, self.text_length, c, generator=g), batch, seed + 400)
        return StageContext(**values)

    def expected_shape(self, component, inputs):
        layout = component.output_layout(inputs.layout)
        return None if layout is None else (inputs.tokens.shape[0], layout.num_tokens, inputs.tokens.shape[2])

    def check_output(self, component, inputs, out):
        assert isinstance(out, StageContext), f"{component.name}: forward must return a StageContext"
        tokens = out.tokens
        assert tokens.ndim == 3 and tokens.shape[0] == inputs.tokens.shape[0]
        assert tokens.shape[2] == inputs.tokens.shape[2], f"{component.name}: a reducer must keep the token width"
        assert 1 <= tokens.shape[1] <= inputs.tokens.shape[1] + 1, f"{component.name}: {tokens.shape[1]} tokens out"
        _check_layout(component, out)

    def test_position(self):
        component = self.instance(meta=True)
        allowed = typing.get_args(typing.get_type_hints(ReducerConfig)["position"])
        assert component.config.position in allowed

    def test_declared_extras_are_enough(self):
        """Given only what `requires` declares, it runs: an undeclared need would crash real pipelines."""
        self.require_real_forward()
        component = self.instance()
        self.run_checked(component, self.make_inputs(component, self.batch_size, self.seed, extras=component.requires))

    def test_requirements_are_real(self):
        """Without any of its declared extras it cannot run; otherwise `requires` needlessly rules encoders out.

        (Only all-or-nothing: a single requirement may be semantic, e.g. PruMerge needs CLS as the first query of
        the attention it reads, not `ctx.cls`.)
        """
        self.require_real_forward()
        component = self.instance()
        if not component.requires:
            pytest.skip(f"{component.name} requires nothing")
        with pytest.raises((ValueError, TypeError, AttributeError, KeyError)):
            self.forward(component, self.make_inputs(component, self.batch_size, self.seed, extras=frozenset()))


# ------------------------------------------------------------------------------------------- connector


class ConnectorConformance(_Conformance):
    """Checks a Connector: tokens (B, N, in_width) -> (B, N', out_width), N' and layout as `output_layout` says."""

    kind = "connector"
    base = Connector
    config_base = ConnectorConfig
    in_width: ClassVar[int] = 16
    out_width: ClassVar[int] = 24
    grids: ClassVar[list[tuple[int, int]]] = [(4, 4), (6, 6)]
    every_parameter_gets_grad = True

    @classmethod
    def construct(cls, config):
        return cls.component(config, in_width=cls.in_width, out_width=cls.out_width)

    def parameters(self):
        return super().parameters() + [("grid", list(self.grids), [f"{h}x{w}" for h, w in self.grids])]

    def make_inputs(self, component, batch, seed, grid=None):
        h, w = grid or self.grids[0]
        tokens = _rows(lambda g: torch.randn(1, h * w, self.in_width, generator=g), batch, seed)
        return StageContext(tokens=tokens, layout=TokenLayout.grid_of(h, w))

    def expected_shape(self, component, inputs):
        layout = component.output_layout(inputs.layout)
        return (inputs.tokens.shape[0], layout.num_tokens, self.out_width)

    def check_output(self, component, inputs, out):
        assert isinstance(out, StageContext), f"{component.name}: forward must return a StageContext"
        assert out.tokens.ndim == 3, f"{component.name}: tokens must be (B, N', width)"
        assert (component.in_width, component.out_width) == (self.in_width, self.out_width), (
            f"{component.name}: in_width/out_width must be the ones it was built with"
        )
        _check_layout(component, out)
        assert out.layout == component.output_layout(inputs.layout), (
            f"{component.name}: forward gives layout {out.layout}, output_layout() declares "
            f"{component.output_layout(inputs.layout)}"
        )

    def test_token_count_per_grid(self, grid):
        self.require_real_forward()
        component = self.instance()
        self.run_checked(component, self.make_inputs(component, self.batch_size, self.seed, grid=grid))


# ------------------------------------------------------------------------------------------- decoder


class DecoderConformance(_Conformance):
    """Checks a Decoder: embed (B, T) ids -> (B, T, hidden); prefill (B, T, hidden) -> (B, vocab) logits; loss."""

    kind = "decoder"
    base = Decoder
    config_base = DecoderConfig
    sequence_length: ClassVar[int] = 8

    def make_inputs(self, component, batch, seed):
        return _rows(lambda g: torch.randn(1, self.sequence_length, component.hidden_size, generator=g), batch, seed)

    def expected_shape(self, component, inputs):
        return (inputs.shape[0], component.vocab_size)

    def check_output(self, component, inputs, out):
        assert isinstance(out, DecoderOutput), f"{component.name}: forward must return a DecoderOutput"
        for attribute in ("hidden_size", "vocab_size"):
            value = getattr(component, attribute)
            assert isinstance(value, int) and value > 0, f"{component.name}: set self.{attribute} in __init__"

    def test_embed(self):
        self.require_real_forward()
        component = self.instance()
        ids = torch.randint(
            0,
            component.vocab_size,
            (self.batch_size, self.sequence_length),
            generator=torch.Generator().manual_seed(self.seed),
        )
        with torch.no_grad():
            embeds = component.embed(ids)
        assert tuple(embeds.shape) == (self.batch_size, self.sequence_length, component.hidden_size)
        assert embeds.is_floating_point() and torch.isfinite(embeds).all()

    def test_first_position_matters(self):
        """Visual tokens come first in the prompt: the first-token logits must depend on position 0."""
        self.require_real_forward()
        component = self.instance()
        embeds = self.make_inputs(component, 1, self.seed)
        changed = embeds.clone()
        changed[:, 0] = torch.randn(changed.shape[-1], generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert not torch.allclose(component(embeds).logits, component(changed).logits), (
                f"{component.name}: the logits ignore the first position (is attention causal over the whole prefix?)"
            )

    def test_all_logits_end_with_the_first_token_logits(self):
        """all_logits=True gives (B, T, vocab), whose last position equals the prefill's first-token logits."""
        self.require_real_forward()
        component = self.instance()
        embeds = self.make_inputs(component, self.batch_size, self.seed)
        with torch.no_grad():
            every = component(embeds, all_logits=True).logits
            first = component(embeds).logits
        assert tuple(every.shape) == (self.batch_size, self.sequence_length, component.vocab_size)
        torch.testing.assert_close(every[:, -1], first, atol=1e-4, rtol=1e-4)

    def test_loss_is_next_token_cross_entropy(self):
        """With labels, the loss is the mean next-token cross-entropy over labels that are not IGNORE_INDEX."""
        self.require_real_forward()
        component = self.instance()
        embeds = self.make_inputs(component, self.batch_size, self.seed)
        labels = torch.randint(
            0, component.vocab_size, (self.batch_size, self.sequence_length), generator=torch.Generator().manual_seed(3)
        )
        labels[:, :3] = IGNORE_INDEX  # e.g. visual tokens and the question: not learned
        out = component(embeds, labels=labels)
        assert out.loss is not None and out.loss.ndim == 0, f"{component.name}: labels must give a scalar loss"
        expected = F.cross_entropy(
            out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        torch.testing.assert_close(out.loss.float(), expected, atol=1e-4, rtol=1e-4)
        out.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in component.parameters()), (
            f"{component.name}: the loss does not reach the parameters"
        )

    def test_a_decoding_step_continues_the_prefill(self):
        """For a decoder that `decodes`: one `step` on the prefill's cache gives the logits a prefill over the
        sequence with that token appended gives, and the cache's bytes are those of the tokens it holds."""
        self.require_real_forward()
        component = self.instance()
        if not component.decodes:
            pytest.skip(f"{component.name} does not decode with a KV cache (decodes = False)")
        embeds = self.make_inputs(component, self.batch_size, self.seed)
        with torch.no_grad():
            first = component(embeds)
            token = first.logits.argmax(dim=-1, keepdim=True)
            assert first.cache is not None, (
                f"{component.name}: the prefill must return its KV cache (DecoderOutput.cache)"
            )
            prefill_bytes = component.cache_bytes(first.cache)
            stepped = component.step(token, first.cache, self.sequence_length).logits
            longer = component(torch.cat([embeds, component.embed(token).to(embeds.dtype)], dim=1)).logits
        assert tuple(stepped.shape) == (self.batch_size, component.vocab_size)
        torch.testing.assert_close(stepped, longer, atol=1e-4, rtol=1e-4)
        assert component.cache_bytes(first.cache) * self.sequence_length == prefill_bytes * (self.sequence_length + 1)

    def test_a_static_cache_decodes_as_the_growing_one(self):
        """For a decoder with a `static_cache` (compile and cudagraph modes decode into it): the prefill written into
        it (twice: a second prefill overwrites the first) and two steps with tensor positions give the logits of
        the decoder's own cache, and its bytes are those of the length it was made for."""
        self.require_real_forward()
        component = self.instance()
        if not component.decodes:
            pytest.skip(f"{component.name} does not decode with a KV cache (decodes = False)")
        embeds = self.make_inputs(component, self.batch_size, self.seed)
        length, dtype = self.sequence_length + 2, embeds.dtype
        with torch.no_grad():
            static = component.static_cache(self.batch_size, length, dtype, embeds.device)
            if static is None:
                pytest.skip(f"{component.name} has no static cache (static_cache returns None): it decodes eagerly")
            grown = component(embeds)
            component(torch.flip(embeds, dims=[1]), cache=static)  # overwritten by the next prefill
            fixed = component(embeds, cache=static)
            torch.testing.assert_close(fixed.logits, grown.logits, atol=1e-4, rtol=1e-4)
            token = grown.logits.argmax(dim=-1, keepdim=True)
            for offset in range(2):
                position = torch.full((self.batch_size, 1), self.sequence_length + offset, dtype=torch.long)
                expected = component.step(token, grown.cache, self.sequence_length + offset).logits
                got = component.step(token, static, position).logits
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
                token = expected.argmax(dim=-1, keepdim=True)
        per_token = component.cache_bytes(grown.cache) // (self.sequence_length + 2)
        assert component.cache_bytes(static) == per_token * length, (
            f"{component.name}: cache_bytes(static cache) must count the {length} tokens it was made for"
        )


# ------------------------------------------------------------------------------------------- registry


SUITES: dict[str, type[_Conformance]] = {
    suite.kind: suite for suite in (EncoderConformance, ReducerConformance, ConnectorConformance, DecoderConformance)
}


def suite_for(component: type, kind: str | None = None, class_name: str | None = None, **attributes) -> type:
    """A ready conformance test class for `component` (kind from its base class), e.g. for parametrized suites.

    TestMine = suite_for(MyEncoder, image_sizes=[64], bad_image_sizes=[60])
    """
    if kind is None:
        kind = next((k for k, s in SUITES.items() if issubclass(component, s.base)), None)
        if kind is None:
            raise TypeError(f"{component!r} is not a component: subclass one of ablate.api's base classes")
    name = class_name or "Test" + re.sub(r"\W", "_", f"{kind}_{component.name}").title().replace("_", "")
    return type(name, (SUITES[kind],), {"component": component, **attributes})


# ------------------------------------------------------------------------------------------------ runtimes


class _PatchStage(nn.Module):
    """pixels -> (B, N, C) tokens through a strided convolution and a GELU: an encoder-like stage."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)

    def forward(self, ctx: StageContext) -> StageContext:
        tokens = F.gelu(self.conv(ctx.pixel_values)).flatten(2).transpose(1, 2)
        return dataclasses.replace(ctx, tokens=tokens, layout=TokenLayout.grid_of(4, 4))


class _ProjectStage(nn.Module):
    """tokens -> tokens through LayerNorm and Linear, with a plugin extra passed on: a connector-like stage."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(8), nn.Linear(8, 12)

    def forward(self, ctx: StageContext) -> StageContext:
        return dataclasses.replace(ctx, tokens=self.proj(self.norm(ctx.tokens)), extras={**ctx.extras, "tag": "kept"})


class _LogitsStage(nn.Module):
    """tokens and prompt ids -> (B, vocab) logits: a prefill-like stage reading an integer input."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(32, 12), nn.Linear(12, 32)

    def forward(self, ctx: StageContext) -> torch.Tensor:
        hidden = torch.cat([ctx.tokens, self.embed(ctx.input_ids)], dim=1)
        return self.head(torch.softmax(hidden @ hidden.transpose(1, 2), dim=-1) @ hidden)[:, -1]


class _KeepAboveMean(nn.Module):
    """Keeps the tokens whose norm is above the mean: a token count decided by the data (a reducer-like stage)."""

    def forward(self, ctx: StageContext) -> StageContext:
        norms = ctx.tokens.norm(dim=-1)
        keep = norms[0] > norms[0].mean()
        return dataclasses.replace(ctx, tokens=ctx.tokens[:, keep], layout=TokenLayout.unstructured(int(keep.sum())))


class RuntimeConformance:
    """Checks a Runtime plugin's promises on small real stages (no VLM needed).

        from ablate.api.testing import RuntimeConformance

        class TestMyRuntime(RuntimeConformance):
            runtime = MyRuntime

    Each stage is prepared on one input and then run on a fresh one of the same shapes: its output must equal the
    eager output on that fresh input (within `rtol` of its largest value), so a graph that froze the example's
    values fails. The encoder-, connector- and prefill-like stages must run in the runtime, unless listed in
    `may_fall_back`; a stage whose token count depends on the data must fall back (StageFallback) or be right
    on an input that keeps another count. Tests skip when the runtime's packages are not installed.
    """

    runtime: ClassVar[type | None] = None  # the Runtime subclass under test: set this
    rtol: ClassVar[float] = 1e-4
    may_fall_back: ClassVar[tuple[str, ...]] = ()  # stages of the suite it may leave to torch
    check_registration: ClassVar[bool] = True

    def _runtime(self):
        from ablate.api.runtimes import Runtime

        if self.runtime is None or not issubclass(self.runtime, Runtime):
            raise TypeError(f"{type(self).__name__}: set `runtime` to a subclass of ablate.api.Runtime")
        if self.runtime.missing():
            pytest.skip(f"runtime {self.runtime.name} needs {', '.join(self.runtime.missing())}")
        return self.runtime(threads=torch.get_num_threads())

    @staticmethod
    def _inputs(seed: int) -> StageContext:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(2, 3, 16, 16, generator=generator)
        ids = torch.randint(0, 32, (2, 5), generator=generator)
        return StageContext(pixel_values=pixels, input_ids=ids, extras={"source": "suite"})

    def _prepared(self, runtime, module: nn.Module, example: Any, static: bool = True):
        from ablate.api.runtimes import RuntimeStage

        torch.manual_seed(0)
        with torch.inference_mode():
            output = module(example)
            stage = RuntimeStage(type(module).__name__, module, module, example, output, static, torch.device("cpu"))
            return runtime.prepare(stage)

    def _check_stage(self, module: nn.Module, to_input, name: str) -> None:
        from ablate.api.runtimes import StageFallback, tensors_of

        runtime = self._runtime()
        torch.manual_seed(0)
        module = module.eval()
        with torch.inference_mode():
            example, fresh = to_input(self._inputs(0)), to_input(self._inputs(1))
        try:
            run = self._prepared(runtime, module, example)
        except StageFallback as exc:
            if name in self.may_fall_back:
                pytest.skip(f"{name} falls back: {exc}")
            raise AssertionError(f"{self.runtime.name} refused the {name}-like stage: {exc}") from None
        with torch.inference_mode():
            expected, got = module(fresh), run(fresh)
            assert not torch.equal(_tensor(module(example)), _tensor(expected))  # the fresh input is another input
        assert type(got) is type(expected), f"{name}: returned a {type(got).__name__}, not a {type(expected).__name__}"
        got_tensors, expected_tensors = tensors_of(got), tensors_of(expected)
        assert len(got_tensors) == len(expected_tensors), f"{name}: the output holds other tensors than eager's"
        for a, b in zip(got_tensors, expected_tensors):
            assert a.shape == b.shape and a.dtype == b.dtype, (
                f"{name}: {a.shape} {a.dtype} vs eager {b.shape} {b.dtype}"
            )
            scale = b.float().abs().max().item() or 1.0
            error = (a.float() - b.float()).abs().max().item() / scale
            assert error <= self.rtol, f"{name}: deviation from eager {error:.2e} > rtol {self.rtol:.0e}"
        if isinstance(expected, StageContext):
            assert got.layout == expected.layout, f"{name}: the layout changed"
            plain = {k: v for k, v in expected.extras.items() if not isinstance(v, torch.Tensor)}
            assert {k: got.extras.get(k) for k in plain} == plain, f"{name}: non-tensor extras were lost"

    def test_name_and_description(self):
        from ablate.api.runtimes import TORCH_RUNTIME, Runtime

        runtime = self.runtime
        assert isinstance(runtime, type) and issubclass(runtime, Runtime), "runtime must subclass ablate.api.Runtime"
        assert isinstance(runtime.name, str) and NAME_PATTERN.match(runtime.name), f"bad name {runtime.name!r}"
        assert runtime.name != TORCH_RUNTIME, f"'{TORCH_RUNTIME}' is ablate's own runtime"
        assert describe(runtime), f"{runtime.__name__} needs a docstring: its first line describes it"

    def test_registered_under_its_name(self):
        if not self.check_registration:
            pytest.skip("check_registration = False")
        module = self.runtime.__module__
        names = {
            ep.name
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
            if module == ep.module or module.startswith(ep.module + ".")
        }
        assert names, f"no entry point of the '{ENTRY_POINT_GROUP}' group points at {module}"
        registry = Registry()
        registry.load_entry_points(only=names, strict=True)
        assert registry.runtime(self.runtime.name) is self.runtime

    def test_a_missing_package_is_an_error_naming_the_extra(self):
        from ablate.api.errors import ResourceError

        lacking = type("Lacking", (self.runtime,), {"requires": ("ablate_no_such_package",)})
        with pytest.raises(ResourceError, match=re.escape(lacking.extra or "ablate_no_such_package")):
            lacking.check()

    def test_an_encoder_like_stage_matches_eager(self):
        self._check_stage(_PatchStage(), lambda ctx: ctx, "encoder")

    def test_a_connector_like_stage_matches_eager(self):
        with torch.inference_mode():
            patch = _PatchStage().eval()
        self._check_stage(_ProjectStage(), lambda ctx: patch(ctx), "connector")

    def test_a_prefill_like_stage_matches_eager(self):
        with torch.inference_mode():
            patch, project = _PatchStage().eval(), _ProjectStage().eval()
        self._check_stage(_LogitsStage(), lambda ctx: project(patch(ctx)), "prefill")

    def test_a_data_dependent_stage_falls_back_or_is_right(self):
        from ablate.api.runtimes import StageFallback, tensors_of

        runtime = self._runtime()
        with torch.inference_mode():
            patch = _PatchStage().eval()
            example, fresh = patch(self._inputs(0)), patch(self._inputs(1))
            stage = _KeepAboveMean()
            try:
                run = self._prepared(runtime, stage, example, static=False)
            except StageFallback:
                return
            expected, got = stage(fresh), run(fresh)
        assert [t.shape for t in tensors_of(got)] == [t.shape for t in tensors_of(expected)], (
            f"{self.runtime.name} ran a data-dependent stage with the example's token count: raise StageFallback "
            f"when RuntimeStage.static is False, or keep the count dynamic"
        )
