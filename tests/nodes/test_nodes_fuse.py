"""Fused LoRA (merged into swapped weights, one sample) against the forward-hook path, in the real ComfyUI.

Both paths must give the same latents (fp32, tight tolerance), the fused path must really be taken
(every target module merged, no hooks), the cost-model policy must pick the path its costs say, layers
loaded the way ComfyUI 0.33's dynamic VRAM loads them must merge when resident, and the input MODEL's
weights must be bit-identical and the very same Parameter objects after a fused run, after an exception
inside a fused model call and after an interrupt.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from comfy_testlib import apply, runs, sample

STEPS = 6
# three distinct keystep steps in 6 steps of each family's schedule: FLUX's shifted schedule reaches only
# progress 0.61 at its last step (a keystep past it never fires), and passes 0.4 only there
KEYSTEPS = {"sd15": "0, 0.4, 0.7", "flux": "0, 0.01, 0.6"}


@pytest.fixture
def fuse(hyperalign_pack):
    return hyperalign_pack.submodule("nodes.fuse")


@pytest.fixture(autouse=True)
def fuse_on_cpu(fuse, monkeypatch):
    """These tests force the fused path (the default, "auto", asks the cost model); no measured costs carry over."""
    monkeypatch.setattr(fuse, "FUSE", "always")
    monkeypatch.setattr(fuse, "_COSTS", weakref.WeakKeyDictionary())


@pytest.fixture
def merges(fuse, monkeypatch):
    """Records each merge the nodes make: (modules merged, targets left to the hooks)."""
    made = []
    original = fuse.fused_weights

    def spy(*args, **kwargs):
        merged, rest = original(*args, **kwargs)
        made.append((len(merged), len(rest)))
        return merged, rest

    monkeypatch.setattr(fuse, "fused_weights", spy)
    return made


def _fused_and_hooked(comfy, tiny, fuse, monkeypatch, model, family, name, node, mode, **kwargs):
    patched = apply(node, model, name, mode=mode, keysteps=KEYSTEPS[family] if mode == "P" else "")
    fused = sample(comfy, tiny, patched, family, 1, steps=STEPS, **kwargs)
    monkeypatch.setattr(fuse, "FUSE", "never")
    hooked = sample(comfy, tiny, patched, family, 1, steps=STEPS, **kwargs)
    monkeypatch.setattr(fuse, "FUSE", "always")
    return fused, hooked


def _target_modules(node, predictor_name: str) -> int:
    """How many modules the predictor's targets live in (FLUX's fused q, k, v slices share one)."""
    loaded = node("HyperAlignLoader", predictor_name=predictor_name).args[0]
    return len({t.comfy for t in loaded.predictor.targets})


@pytest.mark.comfy
@pytest.mark.parametrize(("family", "predictor"), [("sd15", "sd15_a"), ("sd15", "sd15_conv_a"), ("flux", "flux_a")])
@pytest.mark.parametrize(
    ("mode", "sampler", "cfg"), [("I", "euler", 5.0), ("P", "euler", 5.0), ("P", "heun", 1.0), ("S", "euler", 5.0)]
)
def test_fused_equals_hooked(
    comfy,
    tiny,
    base_models,
    predictors,
    node,
    ui_events,
    fuse,
    merges,
    monkeypatch,
    family,
    predictor,
    mode,
    sampler,
    cfg,
):
    model = base_models[family]
    name = predictors[predictor]
    monkeypatch.setattr(fuse, "FUSE_MODES", ("S", "I", "P"))  # S too: its merges must be right as well
    fused, hooked = _fused_and_hooked(
        comfy, tiny, fuse, monkeypatch, model, family, name, node, mode, sampler=sampler, cfg=cfg
    )
    plain = sample(comfy, tiny, model, family, 1, steps=STEPS, sampler=sampler, cfg=cfg)
    predictions = [len(run["calls"]) for run in runs(ui_events)]
    assert predictions[0] == predictions[1] == {"I": 1, "P": 3, "S": STEPS}[mode]
    # the fused run merged every target module once per prediction and left nothing to the hooks
    assert merges == [(_target_modules(node, name), 0)] * predictions[0]
    scale = float(hooked.abs().max())
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-5 * scale)
    assert float((hooked - plain).abs().max()) > 1e-2 * scale  # the LoRA did matter, far beyond the tolerance


@pytest.mark.comfy
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_batches_of_several_samples_keep_the_hooks(comfy, tiny, base_models, predictors, node, fuse, merges, family):
    patched = apply(node, base_models[family], predictors[f"{family}_a"], mode="I")
    sample(comfy, tiny, patched, family, 2, steps=2)
    assert merges == []


@pytest.mark.comfy
def test_policy_reads_hyperalign_fuse(fuse, monkeypatch):
    for forced, expected in (("auto", "auto"), ("always", "always"), ("never", "never"), (True, "always")):
        monkeypatch.setattr(fuse, "FUSE", forced)
        assert fuse.policy() == expected
    monkeypatch.setattr(fuse, "FUSE", "sometimes")
    with pytest.raises(ValueError, match="HYPERALIGN_FUSE='sometimes' is not one of"):
        fuse.policy()


@pytest.fixture
def measured(fuse, monkeypatch):
    """Injected costs for the auto policy: (merge seconds, side-path seconds per call); records each measurement."""
    made = []

    def inject(merge: float, side: float):
        def measure_costs(*args, **kwargs):
            made.append((merge, side))
            return fuse.PathCosts(merge, side)

        monkeypatch.setattr(fuse, "measure_costs", measure_costs)

    inject.made = made
    return inject


@pytest.mark.comfy
@pytest.mark.parametrize(("side", "merges_expected"), [(0.3, True), (0.1, False)])
def test_auto_merges_when_the_cost_model_says_it_pays(
    comfy, tiny, predictors, node, fuse, merges, measured, monkeypatch, side, merges_expected
):
    """I mode over 6 steps: the first call runs hooked and measures; a merge of 1.0 s pays against 5 more calls
    of side paths at 0.3 s (1.5 s), not at 0.1 s (0.5 s). Either way the latents are the hook path's."""
    model = tiny.build_model("sd15", seed=0)
    before = _weights(model)
    name = predictors["sd15_a"]
    patched = apply(node, model, name, mode="I")
    monkeypatch.setattr(fuse, "FUSE", "never")
    hooked = sample(comfy, tiny, patched, "sd15", 1, steps=STEPS)
    monkeypatch.setattr(fuse, "FUSE", "auto")
    measured(1.0, side)
    chosen = sample(comfy, tiny, patched, "sd15", 1, steps=STEPS)
    assert measured.made == [(1.0, side)]  # measured once, on the first call
    assert merges == ([(_target_modules(node, name), 0)] if merges_expected else [])
    torch.testing.assert_close(chosen, hooked, rtol=0, atol=1e-5 * float(hooked.abs().max()))
    again = sample(comfy, tiny, patched, "sd15", 1, steps=STEPS)  # cached: no second measurement
    assert len(measured.made) == 1 and len(merges) == (2 if merges_expected else 0)
    torch.testing.assert_close(again, hooked, rtol=0, atol=1e-5 * float(hooked.abs().max()))
    _assert_same_weights(model, before)


@pytest.mark.comfy
@pytest.mark.parametrize("predictor", ["sd15_a", "sd15_conv_a"])
def test_auto_measures_real_costs_once(comfy, tiny, predictors, node, fuse, merges, monkeypatch, predictor):
    """Unpatched measurement on the tiny model (convolution side paths included): positive costs, cached per model
    and call shape."""
    model = tiny.build_model("sd15", seed=0)
    monkeypatch.setattr(fuse, "FUSE", "auto")
    sample(comfy, tiny, apply(node, model, predictors[predictor], mode="P", keysteps=KEYSTEPS["sd15"]), "sd15", 1)
    (costs,) = fuse._COSTS[model.model.diffusion_model].values()
    assert costs.merge_seconds > 0 and costs.side_seconds > 0


@pytest.mark.comfy
def test_no_room_for_merged_weights_keeps_the_hooks(comfy, tiny, predictors, node, fuse, merges, monkeypatch):
    """Merged copies need memory (FLUX's targets: about 5 GB in bf16): without room, the hooks serve, same result."""
    import comfy.model_management

    model = tiny.build_model("sd15", seed=0)
    name = predictors["sd15_a"]
    fused, _ = _fused_and_hooked(comfy, tiny, fuse, monkeypatch, model, "sd15", name, node, "I")
    assert merges == [(_target_modules(node, name), 0)]
    reserve = comfy.model_management.minimum_inference_memory()
    free = reserve + 1024

    def get_free_memory(dev=None, torch_free_too=False):
        return (free, free) if torch_free_too else free

    monkeypatch.setattr(comfy.model_management, "get_free_memory", get_free_memory)
    patched = apply(node, model, name, mode="I")
    short = sample(comfy, tiny, patched, "sd15", 1, steps=STEPS)
    assert len(merges) == 1  # no second merge
    torch.testing.assert_close(short, fused, rtol=0, atol=1e-5 * float(fused.abs().max()))


def _cast_like_comfyui_033(model) -> int:
    """Mark every layer the way ComfyUI 0.33's loader does (dynamic VRAM on: ``comfy_cast_weights`` on every op
    that has the attribute), weights left resident; returns how many layers were marked."""
    marked = 0
    for module in model.model.diffusion_model.modules():
        if hasattr(module, "comfy_cast_weights"):
            module.comfy_cast_weights = True
            marked += 1
    return marked


@pytest.mark.comfy
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_cast_weight_layers_with_resident_weights_merge(
    comfy, tiny, predictors, node, fuse, merges, monkeypatch, family
):
    """A model loaded as 0.33 loads it (every layer casts its weight per call): the resident target layers are
    merged, every one, and the result is the hook path's."""
    model = tiny.build_model(family, seed=0)
    before = _weights(model)
    assert _cast_like_comfyui_033(model) > 0
    name = predictors[f"{family}_a"]
    fused, hooked = _fused_and_hooked(comfy, tiny, fuse, monkeypatch, model, family, name, node, "I")
    assert merges == [(_target_modules(node, name), 0)]
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-5 * float(hooked.abs().max()))
    _assert_same_weights(model, before)


@pytest.mark.comfy
def test_layers_comfyui_rewrites_per_call_keep_the_hooks(comfy, tiny, predictors, node, fuse, merges, monkeypatch):
    """Layers with a weight function (ComfyUI's weight wrappers; a LoRA loader's low-VRAM patches work the same
    way) stay hooked, decided per layer: the others are merged, and the result is the hook path's."""
    base = tiny.build_model("sd15", seed=0)
    _cast_like_comfyui_033(base)
    model = base.clone()
    keys = [k for k in model.model.state_dict() if k.endswith("attn2.to_k.weight")]
    for key in keys:
        model.add_weight_wrapper(key, lambda weight: weight * 1.0)  # applied on every call, as ComfyUI's are
    patched_layers = keys
    name = predictors["sd15_a"]
    fused, hooked = _fused_and_hooked(comfy, tiny, fuse, monkeypatch, model, "sd15", name, node, "I")
    assert merges == [(_target_modules(node, name) - len(patched_layers), len(patched_layers))]
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-5 * float(hooked.abs().max()))


@pytest.mark.comfy
def test_mergeable_only_when_resident_and_used_as_is(fuse):
    """Per layer: a weight elsewhere than the compute device (low-VRAM offload, 0.33's dynamic-VRAM pool keeps
    the module's own tensor off the device) or rewritten per call keeps the hooks."""
    import comfy.ops

    cpu = torch.device("cpu")
    layer = comfy.ops.manual_cast.Linear(4, 3)  # a cast-weights op, as 0.33's loader makes every layer
    assert layer.comfy_cast_weights and fuse.mergeable(layer, cpu)
    assert not fuse.mergeable(layer, torch.device("meta"))  # not resident on the device the call runs on
    offloaded = comfy.ops.manual_cast.Linear(4, 3, device="meta")
    offloaded._v = (0, 0, 0)  # 0.33: the weight lives in the dynamic-VRAM pool, the module's tensor elsewhere
    assert not fuse.mergeable(offloaded, cpu)
    for attribute, value in (("weight_function", [abs]), ("bias_function", [abs]), ("weight_lowvram_function", abs)):
        patched = comfy.ops.manual_cast.Linear(4, 3)
        setattr(patched, attribute, value)
        assert not fuse.mergeable(patched, cpu), attribute
    fp8 = comfy.ops.manual_cast.Linear(4, 3)
    fp8.weight = torch.nn.Parameter(fp8.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    assert not fuse.mergeable(fp8, cpu)


def _diff_patch(model, seed: int) -> dict:
    """A LoRA-like weight patch on every attention to_q, as a LoRA loader adds."""
    generator = torch.Generator().manual_seed(seed)
    state = model.model.state_dict()
    return {k: (0.05 * torch.randn(state[k].shape, generator=generator),) for k in state if k.endswith("to_q.weight")}


@pytest.mark.comfy
def test_fuses_on_top_of_a_loaded_lora(comfy, tiny, predictors, node, fuse, merges, monkeypatch):
    model = tiny.build_model("sd15", seed=0)
    before = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    lora = model.clone()
    lora.add_patches(_diff_patch(model, 3), 1.0)
    name = predictors["sd15_a"]
    fused, hooked = _fused_and_hooked(comfy, tiny, fuse, monkeypatch, lora, "sd15", name, node, "P")
    assert len(merges) == 3
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-5 * float(hooked.abs().max()))
    without = sample(
        comfy,
        tiny,
        apply(node, model, predictors["sd15_a"], mode="P", keysteps=KEYSTEPS["sd15"]),
        "sd15",
        1,
        steps=STEPS,
    )
    assert float((without - fused).abs().max()) > 1e-2 * float(fused.abs().max())  # the loaded LoRA was merged under
    after = model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------- safety


def _weights(model) -> dict:
    """Every parameter's object and a copy of its value."""
    return {name: (param, param.detach().clone()) for name, param in model.model.named_parameters()}


def _assert_same_weights(model, before: dict) -> None:
    after = dict(model.model.named_parameters())
    assert after.keys() == before.keys()
    swapped = [name for name, (param, _) in before.items() if after[name] is not param]
    assert not swapped, f"weights not restored: {swapped[:3]}"
    changed = [name for name, (param, value) in before.items() if not torch.equal(param, value)]
    assert not changed, f"weights changed: {changed[:3]}"
    hooked = [name for name, m in model.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, f"hooks left on {hooked[:3]}"


def _failing_inside_a_fused_call(comfy, patched, family, action, at_call: int = 3):
    """A clone whose output layer runs `action` on its `at_call`-th forward, checking that the merged
    weights are in place at that moment (so the failure happens mid-fuse)."""
    failing = patched.clone()
    diffusion_model = failing.model.diffusion_model
    last = diffusion_model.out if family == "sd15" else diffusion_model.final_layer
    originals = {id(p) for p in diffusion_model.parameters()}
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == at_call:
            current = {id(p) for p in diffusion_model.parameters()}
            assert current != originals, "the merged weights should be in place here"
            action()

    return failing, last.register_forward_hook(hook)


def _boom():
    raise RuntimeError("boom")


@pytest.mark.comfy
@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("failure", ["none", "exception", "interrupt_in_call", "interrupt_between_steps"])
def test_input_weights_are_bit_identical_after_a_fused_run(
    comfy, tiny, predictors, node, ui_events, merges, family, failure
):
    model = tiny.build_model(family, seed=0)
    before = _weights(model)
    patched = apply(node, model, predictors[f"{family}_a"], mode="P", keysteps=KEYSTEPS[family])
    first = sample(comfy, tiny, patched, family, 1, steps=STEPS)
    assert merges, "the fused path should have been taken"
    _assert_same_weights(model, before)
    if failure == "none":
        return

    def interrupt():
        comfy.mm.interrupt_current_processing()
        if failure == "interrupt_in_call":
            comfy.mm.throw_exception_if_processing_interrupted()  # what ComfyUI's ops and progress hook do

    action = _boom if failure == "exception" else interrupt
    failing, handle = _failing_inside_a_fused_call(comfy, patched, family, action)
    expected = RuntimeError if failure == "exception" else comfy.mm.InterruptProcessingException
    try:
        with pytest.raises(expected):
            sample(comfy, tiny, failing, family, 1, steps=STEPS)
    finally:
        handle.remove()
        comfy.mm.interrupt_current_processing(False)
    _assert_same_weights(model, before)
    assert len(runs(ui_events)) == 2  # the failed run was torn down and reported too
    assert torch.equal(sample(comfy, tiny, patched, family, 1, steps=STEPS), first)
