"""The predictor as ComfyUI's memory manager sees it: a patcher of the class the host builds its own models
with, attached to each patched MODEL as an additional model, and MultiGPU refused in words.

MultiGPU (ComfyUI's MultiGPU CFG Split, Select Model Device) copies a MODEL and its additional models to other
GPUs and runs model calls there in threads; HyperAlign's LoRA sits on one device's layers, so a copied
predictor would leave the other GPUs' samples unaligned. Both ways into that are refused with a
``HyperAlign:`` error: a MODEL that already carries MultiGPU copies at HyperAlign Apply, and a request for a
per-device copy of the predictor later (ComfyUI asks the factory in ``cached_patcher_init`` for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher

from ..hyperalign.io import Predictor

MULTIGPU_KEY = "multigpu"  # ComfyUI's additional-model key for a MODEL's copies on other GPUs
_ONE_GPU = "HyperAlign applies its per-sample LoRA on one GPU only"


class MultiGPUUnsupported(RuntimeError):
    """A RuntimeError, as ComfyUI expects from a model it cannot copy to another device: Select Model Device
    then keeps the model where it is (and logs this message); MultiGPU CFG Split fails with it."""


def host_patcher_class() -> type:
    """The patcher class the host builds models with: ``CoreModelPatcher`` where it exists (0.33 has it:
    ModelPatcherDynamic when dynamic VRAM is on, which itself falls back to ModelPatcher on CPU), else
    ``ModelPatcher`` (0.3.x). Read at call time: ComfyUI's main.py sets it after the imports."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def refuse_device_copy(*args, **kwargs):
    """Stands where ComfyUI looks for a factory of fresh per-device copies (``cached_patcher_init``)."""
    raise MultiGPUUnsupported(
        "HyperAlign: ComfyUI asked for a copy of the HyperAlign predictor on another device (MultiGPU CFG Split, "
        f"or Select Model Device placed after HyperAlign Apply); {_ONE_GPU}. HINT: remove MultiGPU CFG Split from "
        "this workflow, and put Select Model Device before HyperAlign Apply."
    )


def refuse_multigpu(model) -> None:
    """Refuse a MODEL that carries MultiGPU copies for other GPUs (MultiGPU CFG Split before HyperAlign Apply)."""
    copies = model.get_additional_models_with_key(MULTIGPU_KEY)
    if copies:
        devices = ", ".join(sorted({str(copy.load_device) for copy in copies}))
        raise ValueError(
            f"HyperAlign: the connected MODEL is set up for MultiGPU (copies on {devices}); {_ONE_GPU}. "
            "HINT: remove MultiGPU CFG Split from this workflow."
        )


@dataclass(eq=False)
class LoadedPredictor:
    """What a HYPERALIGN_PREDICTOR socket carries: the predictor, and the patcher through which ComfyUI's
    model management loads and offloads its weights. Patched MODELs get clones of that patcher, so the
    cached predictor outlives them without looking like a leak to ComfyUI."""

    predictor: Predictor
    patcher: comfy.model_patcher.ModelPatcher

    @classmethod
    def wrap(cls, predictor: Predictor) -> LoadedPredictor:
        patcher = host_patcher_class()(
            predictor.hypernet,
            load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )
        return cls(predictor, patcher)

    def clone_for_model(self) -> comfy.model_patcher.ModelPatcher:
        """A clone of the patcher for one patched MODEL's additional models, carrying the MultiGPU refusal
        where ComfyUI looks for a per-device factory (set on each clone: ComfyUI 0.3.x clones drop it)."""
        patcher = self.patcher.clone()
        patcher.cached_patcher_init = (refuse_device_copy, ())
        return patcher
