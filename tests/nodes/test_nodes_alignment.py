"""HyperAlign Apply against plain ComfyUI sampling and against an independent reference.

The reference shares nothing with nodes/ but the predictor file: for one sample it loads the
predictor with the core library, and a test-written APPLY_MODEL wrapper on a deep copy of the
model, at the first model call of each new schedule sigma, runs the pristine base model (a full
forward pass, features captured by a hook), the hypernetwork, and writes W + s * up @ down into the
copy's weights (fused FLUX layers: into their row slice). ComfyUI's own sampler does the rest.
"""

from __future__ import annotations

import pytest
import torch
from comfy_testlib import NEGATIVE_SEED, SCHEDULER, STEPS, apply, runs, sample

import hyperalign
from hyperalign.hypernet import feature_tokens

FAMILIES = ["sd15", "flux", "sdxl"]
UNETS = ("sd15", "sdxl")  # UNet families: DDPM time, middle-block features, text tokens as the prompt

# ------------------------------------------------------------------------------ identity and basics


@pytest.mark.comfy
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_predictor_gives_bit_identical_latents(comfy, tiny, base_models, predictors, node, ui_events, family):
    model = base_models[family]
    patched = apply(node, model, predictors[f"{family}_identity"])
    for sampler, cfg in (("euler", 5.0), ("heun", 1.0)):
        plain = sample(comfy, tiny, model, family, 2, sampler=sampler, cfg=cfg)
        aligned = sample(comfy, tiny, patched, family, 2, sampler=sampler, cfg=cfg)
        assert torch.equal(plain, aligned), f"{sampler}: max diff {float((plain - aligned).abs().max())}"
    assert [len(run["calls"]) for run in runs(ui_events)] == [STEPS, STEPS]  # the hypernet did run


# ---------------------------------------------------------------------------------- the reference


class _Reference:
    """Per-sample merged-weight sampling; see the module docstring."""

    def __init__(self, comfy, tiny, base_model, family, predictor_path, strength=1.0):
        self.family = family
        self.pristine = base_model.model  # only ever run forward, never written
        self.predictor = hyperalign.load_predictor(predictor_path)
        self.scale = self.predictor.hypernet.cfg.scale * strength
        # a copy to merge into: a fresh model of the family with the base weights (ComfyUI 0.33's model config
        # objects cannot be deep-copied)
        copied = tiny.build_model(family).model
        copied.load_state_dict(base_model.model.state_dict())
        self.modules = dict(copied.diffusion_model.named_modules())
        self.weights = {t.comfy: self.modules[t.comfy].weight.detach().clone() for t in self.predictor.targets}
        self.patcher = comfy.model_patcher.ModelPatcher(
            copied, load_device=base_model.load_device, offload_device=base_model.offload_device
        )
        self.patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "reference", self._wrapper)
        self.steps: list[int] = []

    def _features(self, x, sigma, context, kwargs):
        dm, ms = self.pristine.diffusion_model, self.pristine.model_sampling
        cfg = self.predictor.hypernet.cfg
        unet = self.family in UNETS
        site = dm.middle_block[-1] if unet else dm.double_blocks[cfg.encoder_blocks - 1]
        seen = []
        handle = site.register_forward_hook(
            lambda module, args, out: seen.append(out[0].clone() if isinstance(out, tuple) else out.clone())
        )
        try:
            with torch.no_grad():
                timestep = ms.timestep(sigma).float()
                if unet:  # SDXL's pooled text and size embeddings (y) as the sampler computed them
                    dm(ms.calculate_input(sigma, x), timestep, context=context, y=kwargs.get("y"))
                else:
                    dm(x, timestep, context, y=kwargs["y"], guidance=kwargs["guidance"])
        finally:
            handle.remove()
        if unet:
            return feature_tokens(seen[0], cfg.feature_grid)
        tokens = seen[0]  # (1, n, hidden) image stream (blocks update it in place: cloned)
        rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
        grid = tokens[:, : rows * cols].reshape(1, rows, cols, -1).permute(0, 3, 1, 2)
        return feature_tokens(grid, cfg.feature_grid)

    def _predict(self, x, sigma, context, kwargs):
        t = self.pristine.model_sampling.timestep(sigma).float()
        progress = 1.0 - (t / 999.0 if self.family in UNETS else t)
        prompt = context if self.family in UNETS else kwargs["y"][:, None, :]
        with torch.no_grad():
            return self.predictor.hypernet(self._features(x, sigma, context, kwargs), progress, prompt)

    def _merge(self, factors):
        with torch.no_grad():
            fresh = {path: weight.clone() for path, weight in self.weights.items()}
            for target in self.predictor.targets:
                down, up = factors[target.id]
                delta = self.scale * (up[0] @ down[0])
                rows = slice(*target.out_slice) if target.out_slice else slice(None)
                fresh[target.comfy][rows] += delta
            for path, weight in fresh.items():
                self.modules[path].weight.copy_(weight)

    def _wrapper(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        sigmas = transformer_options["sample_sigmas"]
        exact = [i for i in range(len(sigmas) - 1) if float(sigmas[i]) == float(t[0])]
        if exact and (not self.steps or exact[-1] > self.steps[-1]):
            step = [i for i in exact if not self.steps or i > self.steps[-1]][0]
            row = transformer_options["cond_or_uncond"].index(0)  # one sample: chunk index == row
            cond_kwargs = {k: v[row : row + 1] for k, v in kwargs.items() if torch.is_tensor(v)}
            self._merge(self._predict(x[row : row + 1], t[row : row + 1], c_crossattn[row : row + 1], cond_kwargs))
            self.steps.append(step)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def sample_one(self, comfy, tiny, noise, positive_row, negative, sampler, cfg):
        self.steps = []
        latent = torch.zeros_like(noise)
        out = comfy.sample.sample(
            self.patcher,
            noise,
            STEPS,
            cfg,
            sampler,
            SCHEDULER[self.family],
            positive_row,
            negative,
            latent,
            seed=0,
            disable_pbar=True,
        )
        return out, list(self.steps)


def _row(conditioning, index):
    cond, extras = conditioning[0]
    extras = {k: (v[index : index + 1] if torch.is_tensor(v) else v) for k, v in extras.items()}
    return [[cond[index : index + 1], extras]]


CASES = [  # (cfg, batch, sampler): each of CFG on/off, batch 1/3, first/second order appears per family
    (5.0, 3, "euler"),
    (1.0, 1, "euler"),
    (5.0, 1, "heun"),
    (1.0, 3, "dpmpp_2m"),
]


@pytest.mark.comfy
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("cfg", "batch", "sampler"), CASES)
def test_each_row_equals_its_own_merged_lora_reference(
    comfy, tiny, base_models, predictors, predictor_dir, node, ui_events, family, cfg, batch, sampler
):
    model = base_models[family]
    name = predictors[f"{family}_a"]
    aligned = sample(comfy, tiny, apply(node, model, name), family, batch, sampler=sampler, cfg=cfg)
    plain = sample(comfy, tiny, model, family, batch, sampler=sampler, cfg=cfg)
    (run,) = runs(ui_events)
    assert [call["step"] for call in run["calls"]] == list(range(STEPS))

    reference = _Reference(comfy, tiny, model, family, predictor_dir / name)
    noise = comfy.sample.prepare_noise(tiny.empty_latent(family, batch)["samples"], 0)
    positive, negative = tiny.conditioning(family, batch, 1), tiny.conditioning(family, 1, NEGATIVE_SEED)
    for b in range(batch):
        expected, steps = reference.sample_one(comfy, tiny, noise[b : b + 1], _row(positive, b), negative, sampler, cfg)
        assert steps == list(range(STEPS))
        scale = float(expected.abs().max())
        torch.testing.assert_close(aligned[b : b + 1], expected, rtol=0, atol=2e-5 * scale)
        # and the LoRA did matter: far beyond the tolerance
        assert float((aligned[b] - plain[b]).abs().max()) > 1e-2 * scale
