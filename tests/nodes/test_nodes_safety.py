"""The input MODEL stays exactly as it was; branches and other patches do not interfere."""

from __future__ import annotations

import pytest
import torch
from comfy_testlib import apply, sample


def _snapshot(model) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.model.state_dict().items()},
        "wrappers": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()},
        "callbacks": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.callbacks.items()},
        "additional": {k: list(v) for k, v in model.additional_models.items()},
        "attachments": dict(model.attachments),
        "model_options": repr(model.model_options),
        "patches": {k: list(v) for k, v in model.patches.items()},
        "object_patches": dict(model.object_patches),
    }


def _assert_unchanged(model, before: dict) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k in before["state"] if not torch.equal(after["state"][k], before["state"][k])]
    assert not changed, f"weights changed: {changed[:3]}"
    for key in ("wrappers", "callbacks", "additional", "attachments", "model_options", "patches", "object_patches"):
        assert after[key] == before[key], key
    hooked = [name for name, m in model.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, f"hooks left on {hooked[:3]}"


@pytest.fixture
def fresh_sd15(tiny):
    """A model of its own: ComfyUI patches shared weights in place while a clone with patches is loaded."""
    return tiny.build_model("sd15", seed=0)


def _raising_wrapper(comfy, action):
    """An APPLY_MODEL wrapper that runs inside HyperAlign's (registered after it) and fails on the 2nd call."""
    calls = []

    def wrapper(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            model = executor.class_obj.diffusion_model
            assert any(m._forward_hooks for m in model.modules()), "HyperAlign's hooks should be active here"
            action()
        return executor(*args, **kwargs)

    return wrapper


def _interrupt(comfy):
    comfy.mm.interrupt_current_processing()
    comfy.mm.throw_exception_if_processing_interrupted()  # what ComfyUI's ops and progress hook do


def _boom():
    raise RuntimeError("boom")


@pytest.mark.comfy
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("failure", ["none", "exception", "interrupt_in_call", "interrupt_from_callback"])
def test_input_model_is_exactly_as_before(comfy, tiny, predictors, node, ui_events, failure, family):
    fresh = tiny.build_model(family, seed=0)  # a model of its own (see fresh_sd15)
    before = _snapshot(fresh)
    patched = apply(node, fresh, predictors[f"{family}_a"])
    _assert_unchanged(fresh, before)  # Apply itself only cloned
    first = sample(comfy, tiny, patched, family, 2)
    positive, negative = tiny.conditioning(family, 2, 1), tiny.conditioning(family, 1, 99)
    latent = tiny.empty_latent(family, 2)["samples"]
    noise = comfy.sample.prepare_noise(latent, 0)
    failing, callback, expected = patched, None, None
    if failure in ("exception", "interrupt_in_call"):
        failing = patched.clone()
        action = _boom if failure == "exception" else (lambda: _interrupt(comfy))
        failing.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test", _raising_wrapper(comfy, action)
        )
        expected = RuntimeError if failure == "exception" else comfy.mm.InterruptProcessingException
    elif failure == "interrupt_from_callback":
        callback = lambda step, *rest: step == 1 and comfy.mm.interrupt_current_processing()  # noqa: E731
        expected = comfy.mm.InterruptProcessingException
    try:
        if expected is None:
            comfy.sample.sample(
                failing, noise, 4, 5.0, "euler", "normal", positive, negative, latent, seed=0, disable_pbar=True
            )
        else:
            with pytest.raises(expected):
                comfy.sample.sample(
                    failing,
                    noise,
                    4,
                    5.0,
                    "euler",
                    "normal",
                    positive,
                    negative,
                    latent,
                    seed=0,
                    callback=callback,
                    disable_pbar=True,
                )
    finally:
        comfy.mm.interrupt_current_processing(False)
    _assert_unchanged(fresh, before)
    reports = [data for event, data in ui_events if event == "hyperalign.run"]
    assert len(reports) == 2  # the failed run was torn down and reported too
    # and the patched model samples exactly as before: no state survived the failed run
    assert torch.equal(sample(comfy, tiny, patched, family, 2), first)


@pytest.mark.comfy
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_two_apply_branches_give_the_same_images_as_alone(comfy, tiny, base_models, predictors, node, family):
    model = base_models[family]
    alone_a = sample(comfy, tiny, apply(node, model, predictors[f"{family}_a"]), family, 2)
    alone_b = sample(comfy, tiny, apply(node, model, predictors[f"{family}_b"]), family, 2)
    branch_a = apply(node, model, predictors[f"{family}_a"])
    branch_b = apply(node, model, predictors[f"{family}_b"])
    together_b = sample(comfy, tiny, branch_b, family, 2)
    together_a = sample(comfy, tiny, branch_a, family, 2)
    assert torch.equal(together_a, alone_a) and torch.equal(together_b, alone_b)
    assert not torch.equal(alone_a, alone_b)


def _diff_patch(model, seed: int) -> dict:
    """A LoRA-like weight patch ("diff" format) on every attention to_q and one conv, as a LoRA loader adds."""
    generator = torch.Generator().manual_seed(seed)
    state = model.model.state_dict()
    keys = [k for k in state if k.endswith("to_q.weight")] + ["diffusion_model.input_blocks.0.0.weight"]
    return {k: (0.05 * torch.randn(state[k].shape, generator=generator),) for k in keys}


@pytest.mark.comfy
def test_composes_with_lora_patches_and_other_wrappers(comfy, tiny, fresh_sd15, predictors, node, ui_events):
    patch = _diff_patch(fresh_sd15, 3)
    lora = fresh_sd15.clone()
    lora.add_patches(patch, 1.0)
    lora_only = sample(comfy, tiny, lora, "sd15", 2)
    # a LoRA loaded before HyperAlign Apply, and one loaded after it: identity HyperAlign changes nothing
    before = sample(comfy, tiny, apply(node, lora, predictors["sd15_identity"]), "sd15", 2)
    after_model = apply(node, fresh_sd15, predictors["sd15_identity"]).clone()
    after_model.add_patches(patch, 1.0)
    after = sample(comfy, tiny, after_model, "sd15", 2)
    assert torch.equal(before, lora_only) and torch.equal(after, lora_only)
    # another pack's wrapper still runs, with HyperAlign's hooks active inside it
    seen = []

    def other(executor, *args, **kwargs):
        seen.append(any(m._forward_hooks for m in executor.class_obj.diffusion_model.modules()))
        return executor(*args, **kwargs)

    aligned = apply(node, lora, predictors["sd15_a"])
    aligned.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other", other)
    result = sample(comfy, tiny, aligned, "sd15", 2)
    assert seen == [True] * 4
    assert float((result - lora_only).abs().max()) > 1e-2 * float(lora_only.abs().max())
    assert [len(d["calls"]) for e, d in ui_events if e == "hyperalign.run"] == [4, 4, 4]
