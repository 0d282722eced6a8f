"""ablate's encoder conformance suite on this plugin: shapes, token counts, size errors, dtypes, gradients..."""

from ablate.api.testing import EncoderConformance
from ablate_example_encoder import PatchConvEncoder


class TestPatchConv(EncoderConformance):
    component = PatchConvEncoder
    config_overrides = {"width": 16, "depth": 1}  # tiny: every test runs in milliseconds
    image_sizes = [32, 64, 96]  # any multiple of the patch size
    bad_image_sizes = [30, 100]  # not multiples of 8: must fail with ImageSizeError naming the size
    every_parameter_gets_grad = True  # no unused layers: a parameter without a gradient is a bug
