"""Test-only ComfyUI nodes: tiny random models and conditioning, for the HTTP server tests.

ComfyUI's standard loaders only accept full-size checkpoints, so the server gets its tiny SD1.5 /
FLUX model and prompts from these nodes (V1 API, the simplest). Not part of the HyperAlign pack.
"""

from . import tiny

FAMILIES = ["sd15", "flux"]


class HyperAlignTestTinyModel:
    CATEGORY = "_for_testing/hyperalign"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def build(self, family, seed):
        return (tiny.build_model(family, seed),)


class HyperAlignTestConditioning:
    CATEGORY = "_for_testing/hyperalign"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "family": (FAMILIES,),
                "batch": ("INT", {"default": 1, "min": 1, "max": 8}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            }
        }

    def build(self, family, batch, seed):
        return tiny.conditioning(family, batch, seed), tiny.conditioning(family, 1, seed + 1000)


NODE_CLASS_MAPPINGS = {
    "HyperAlignTestTinyModel": HyperAlignTestTinyModel,
    "HyperAlignTestConditioning": HyperAlignTestConditioning,
}
