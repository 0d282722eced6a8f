"""Every registered component runs through the plugin-author conformance suites in `ablate.api.testing`.

Registering a component enrols it here automatically (timm-style): one test class per component and case, generated
at collection time from the live registry, so built-ins, the example plugin and any installed third-party plugin are
held to the same bar. `CASES` only picks tiny configs for components whose defaults are big; a component not in
it runs with its Config defaults.
"""

from __future__ import annotations

import re

import pytest

from ablate.api.hooks import KINDS
from ablate.api.registry import get_registry
from ablate.api.testing import suite_for


def full_size(**attributes) -> dict[str, dict]:
    """A full-size encoder: shapes on the meta device in the fast suite, real forwards only under `-m slow`."""
    return {
        "meta": dict(attributes, real_forward=False),
        "full": dict(attributes, pytestmark=[pytest.mark.slow]),
    }


VIT_TINY = {"model_name": "vit_tiny_patch16_224"}

# (kind, name) -> {case: attributes of the generated test class}. Keep every case fast (tiny sizes).
CASES: dict[tuple[str, str], dict[str, dict]] = {
    ("encoder", "timm"): {
        # Final features of a ViT (forward_features; CLS split off) at its native size.
        "vit": dict(config_overrides={**VIT_TINY, "image_size": 224}, bad_image_sizes=[200]),
        # LLaVA's path: an intermediate block's tokens, attention of the next block (forward_intermediates, NLC).
        "vit_block": dict(config_overrides={**VIT_TINY, "image_size": 64, "feature_block": -2}, bad_image_sizes=[72]),
        # A conv net's intermediate stage (forward_intermediates, NCHW map -> tokens), at two sizes.
        "convnext_block": dict(
            config_overrides={"model_name": "convnext_atto", "image_size": 64, "feature_block": 2},
            image_sizes=[64, 96],
            bad_image_sizes=[50],
        ),
    },
    ("encoder", "fastvit-tiny"): {"tiny": dict(image_sizes=[128, 256], bad_image_sizes=[100])},
    ("encoder", "fastvithd"): full_size(image_sizes=[256, 512, 1024], bad_image_sizes=[1000]),
    ("encoder", "fastvit-mci2"): full_size(image_sizes=[256, 512], bad_image_sizes=[1000]),
    ("encoder", "fastvit-mci4"): full_size(image_sizes=[256, 1024], bad_image_sizes=[1000]),
    ("encoder", "fastvit"): {"tiny": dict(image_sizes=[128, 192], bad_image_sizes=[100])},
    # Reducers run on a 4x4 grid (16 tokens): budgets that fit it, and each mode of the budgeted ones.
    ("reducer", "matryoshka"): {"full": {}, "all_scales": dict(config_overrides={"tokens": 4, "all_scales": True})},
    ("reducer", "avgpool"): {
        "kernel": {},
        "tokens": dict(config_overrides={"tokens": 1}),
        "adaptive": dict(config_overrides={"tokens": 9, "adaptive": True}),
    },
    ("reducer", "prumerge"): {"adaptive": {}, "budget": dict(config_overrides={"tokens": 5})},
    ("reducer", "prumerge-plus"): {"adaptive": {}, "budget": dict(config_overrides={"tokens": 6})},
    ("reducer", "visionzip"): {
        "cls": dict(config_overrides={"tokens": 6, "contextual": 2}),
        "substitute": dict(config_overrides={"tokens": 6, "score": "attention_received"}),
    },
    ("reducer", "random"): {"budget": dict(config_overrides={"tokens": 5})},
    ("reducer", "divprune"): {"ratio": {}, "budget": dict(config_overrides={"tokens": 5})},
    ("reducer", "vispruner"): {
        "cls": dict(config_overrides={"tokens": 6, "score": "cls"}),
        "substitute": dict(config_overrides={"tokens": 6, "score": "attention_received"}),
    },
    ("reducer", "cdpruner"): {"budget": dict(config_overrides={"tokens": 6})},
    ("reducer", "dart"): {"budget": dict(config_overrides={"tokens": 6})},
    # FastVLM's baselines: full-size towers (shapes on meta; real forwards under -m slow).
    ("encoder", "clip-vit-l14-336"): full_size(bad_image_sizes=[300]),
    ("encoder", "siglip-so400m"): full_size(bad_image_sizes=[380]),
    ("encoder", "convnext-l-clip"): full_size(image_sizes=[320, 512], bad_image_sizes=[300]),
    ("encoder", "convllava"): full_size(image_sizes=[768, 1024], bad_image_sizes=[800]),
    # AnyRes over a tiny ViT tile of 64 px (16 tokens): 1 tile + base at 64 px, 2x2 tiles + base at 128 px.
    ("encoder", "anyres"): {
        "tiny": dict(
            config_overrides={"tile": {"name": "timm", **VIT_TINY, "image_size": 64}},
            image_sizes=[64, 128],
            bad_image_sizes=[0],
        )
    },
    ("connector", "ldpv2"): {"tiny": dict(config_overrides={"output_grid": 2})},
    # The suite feeds plain grids, which llava-anyres only projects: its image_newline acts on tiled layouts
    # (tests/test_anyres.py and the LLaVA-OneVision checkpoint tests cover those).
    ("connector", "llava-anyres"): {"grids": dict(every_parameter_gets_grad=False)},
}
DEFAULT_CASE = {"defaults": {}}


def _slug(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _enrol() -> list[tuple[str, str]]:
    """Create one test class per registered component and case in this module; return what was enrolled."""
    enrolled = []
    for kind in KINDS:
        for name, component in sorted(get_registry().components[kind].items()):
            for case, attributes in CASES.get((kind, name), DEFAULT_CASE).items():
                class_name = f"Test{kind.title()}_{_slug(name)}_{case}"
                globals()[class_name] = suite_for(component, kind=kind, class_name=class_name, **attributes)
            enrolled.append((kind, name))
    return enrolled


ENROLLED = _enrol()


def test_every_builtin_kind_is_enrolled():
    assert {kind for kind, _ in ENROLLED} == {"encoder", "reducer", "connector", "decoder"}


def test_cases_name_registered_components():
    """A renamed or unregistered component must not silently drop out of its tiny case."""
    stale = sorted(set(CASES) - set(ENROLLED))
    broken = {p.name: p.error for p in get_registry().plugins.values() if p.error}
    assert not stale, f"CASES names components that are not registered: {stale}. Plugin errors: {broken}"
