"""Peak GPU memory of one trainer step at real size, with random weights (a section of benchmarks/gpu_check.py).

The trainer's own code runs: ``training.engine.build`` (the shipped preset, its hypernet, optimiser, accelerate
with bf16 autocast, gradient and VAE checkpointing), then one micro-batch of ``training.loop.reward_loss`` (a
rollout to a sampled step k, the prediction with gradients, the step through the LoRA, the checkpointed VAE
decode, the reward) and of ``preference_loss``, each back-propagated, and the optimiser step. Only the loading
differs: the base model's modules are built from their real configs on the device with random weights (no
files), the tokenizers are stand-ins that give token ids of the right length, and the reward is a random
OpenCLIP-ViT-H-shaped CLIP (the HPS v2.1 architecture, about 1 B parameters) scoring the images against the
prompt's text features.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GB = 2**30

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD1.x's otherwise
SD15_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, max_position_embeddings=77)  # fmt: skip
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
FLUX_VAE = dict(SD15_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, sample_size=1024)  # fmt: skip
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)  # fmt: skip
HPS_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, image_size=224)  # fmt: skip
HPS_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                max_position_embeddings=77)  # fmt: skip
DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1, clip_sample=False)  # fmt: skip
FLOW = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)  # fmt: skip

# --tiny: the same code on shapes a CPU runs in seconds
TINY = {
    "sd15_unet": dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    "vae": dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=32),
    "clip_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      projection_dim=32, max_position_embeddings=77),
    "flux": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),
    "t5": dict(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=128, feed_forward_proj="gated-gelu",
               is_encoder_decoder=False, use_cache=False),
    "hps_vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                       image_size=224),
    "hps_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=77),
}  # fmt: skip


class StandInTokenizer:
    """Token ids of the requested length (what the text encoders see; the values do not matter here)."""

    model_max_length = 77

    def __init__(self, vocab: int = 1000):
        self.vocab = vocab

    def __call__(self, prompts, padding=None, max_length=77, truncation=True, return_tensors="pt"):
        ids = torch.arange(len(prompts) * max_length).reshape(len(prompts), max_length) % self.vocab
        return type("Tokens", (), {"input_ids": ids})()


@contextlib.contextmanager
def _built_on(device, dtype):
    """Modules constructed inside are created on `device` in `dtype` by their own initialisers: no host copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


class RandomHPS(torch.nn.Module):
    """HPS v2.1's shape (OpenCLIP ViT-H-14: image tower 1280 x 32, text tower 1024 x 24) with random weights:
    score = cosine(image features, prompt features), differentiable w.r.t. the images."""

    def __init__(self, tiny: bool):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        config = CLIPConfig(
            vision_config=TINY["hps_vision"] if tiny else HPS_VISION,
            text_config=TINY["hps_text"] if tiny else HPS_TEXT,
            projection_dim=32 if tiny else 1024,
        )
        self.clip = CLIPModel(config)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from training.rewards import clip_preprocess

        pixels = clip_preprocess(images).to(self.clip.dtype)
        image = self.clip.get_image_features(pixel_values=pixels)
        with torch.no_grad():
            ids = StandInTokenizer()(prompts).input_ids.to(pixels.device)
            text = self.clip.get_text_features(input_ids=ids)
        image = getattr(image, "pooler_output", image)  # transformers 5 returns an output object
        text = getattr(text, "pooler_output", text)
        return torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)


TINY_WORLD = {"tiny": False}


def load_random_hps(spec, device, dtype):
    """The reward registry's loader signature (training.rewards)."""
    with _built_on(device, dtype):
        reward = RandomHPS(TINY_WORLD["tiny"])
    return reward.eval().requires_grad_(False)


def build_adapter(family: str, cfg, device, dtype, tiny: bool):
    """The family's trainer adapter around base modules built from their real configs with random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from training.flux import FluxAdapter
    from training.sd15 import SD15Adapter

    vae_config = TINY["vae"] if tiny else (SD15_VAE if family == "sd15" else FLUX_VAE)
    if tiny and family == "flux":
        vae_config = dict(vae_config, latent_channels=4, shift_factor=0.1, scaling_factor=0.3)
    with _built_on(device, dtype):
        vae = AutoencoderKL(**vae_config)
        clip = CLIPTextModel(CLIPTextConfig(**(TINY["clip_text"] if tiny else CLIP_L_TEXT)))
        if family == "sd15":
            unet = UNet2DConditionModel(**(TINY["sd15_unet"] if tiny else SD15_UNET))
            return SD15Adapter(cfg, device, dtype, unet, vae, clip, StandInTokenizer(), dict(DDIM))
        transformer = FluxTransformer2DModel(**(TINY["flux"] if tiny else FLUX_TRANSFORMER))
        t5 = T5EncoderModel(T5Config(**(TINY["t5"] if tiny else T5_XXL)))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLOW)
    return FluxAdapter(
        cfg, device, dtype, transformer, vae, clip, StandInTokenizer(), t5, StandInTokenizer(), scheduler
    )


def _overrides(family: str, folder: Path, tiny: bool, device) -> list[str]:
    (folder / "prompts.txt").write_text("a photo of a corgi\n")
    (folder / "pairs.jsonl").write_text("")
    extra = [
        f"model.path={str(folder)!r}",
        "rewards=[{'name': 'gpu_check_hps'}]",
        "data.preference='local'",
        f"data.path={str(folder / 'pairs.jsonl')!r}",
        f"data.prompts={str(folder / 'prompts.txt')!r}",
        "data.num_workers=0",
        f"run.output_dir={str(folder / 'runs')!r}",
        "run.report_to='none'",
        "run.progress=False",
        "objective.step_range=[0.0, 0.1]",  # k early: a short rollout; the memory of step k does not depend on k
    ]
    if family == "flux":
        extra.append("model.resolution=1024")  # the final-run setting; the preset trains at 512
    if device.type == "cpu":
        extra += ["run.cpu=True", "run.mixed_precision='no'", "model.base_dtype='fp32'"]
    if tiny:
        extra += ["model.resolution=32", "model.max_sequence_length=16", "sampling.num_steps=4", "hypernet.dim=32",
                  "hypernet.depth=1", "hypernet.heads=2", "hypernet.basis=4", "hypernet.feature_grid=4",
                  "hypernet.encoder_blocks=1"]  # fmt: skip
    return extra


def measure(family: str, device: torch.device, tiny: bool = False, log=print) -> list[str]:
    """Build the trainer and run one step; returns Markdown lines with the memory figures."""
    import training.engine as engine
    from training.config import load_config
    from training.loop import preference_loss, reward_loss
    from training.rewards import REWARDS

    REWARDS["gpu_check_hps"] = "train_memory:load_random_hps"
    TINY_WORLD["tiny"] = tiny
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="hyperalign_gpu_check_") as tmp:
        folder = Path(tmp)
        cfg = load_config(
            REPO_ROOT / "training" / "configs" / f"{family}.yaml", _overrides(family, folder, tiny, device)
        )
        original = engine.load_adapter

        def load_adapter(model_cfg, device_, dtype=None):
            dtype = dtype or engine.DTYPES[model_cfg.base_dtype]
            adapter = build_adapter(family, model_cfg, torch.device(device_), dtype, tiny)
            adapter.freeze()
            if model_cfg.gradient_checkpointing:
                adapter.denoiser.enable_gradient_checkpointing()
            return adapter

        if cuda:  # what other sections left allocated is not this step's
            torch.cuda.synchronize(device)
        already = torch.cuda.memory_allocated(device) if cuda else 0
        started = time.perf_counter()
        engine.load_adapter = load_adapter
        try:
            _reset_accelerate()
            tr = engine.build(cfg, engine.make_accelerator(cfg), with_data=False)
        finally:
            engine.load_adapter = original
        log(f"train_{family}: trainer built in {time.perf_counter() - started:.0f} s")
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        weights = torch.cuda.memory_allocated(device) - already if cuda else 0
        batch_size = cfg.optim.batch_size
        batch = {"prompt": ["a photo of a corgi"] * batch_size, "index": torch.arange(batch_size)}
        acc, peaks = tr.accelerator, {}
        started = time.perf_counter()
        with acc.autocast():
            loss, metrics = reward_loss(tr, batch, 0)
            acc.backward(loss)
        tr.adapter.state.clear()
        peaks["reward term (rollout, step k with gradients, VAE decode, reward, backward)"] = _peak(device)
        side = tr.adapter.cfg.resolution // tr.adapter.vae_scale
        channels = tr.adapter.denoiser.config.in_channels if family == "sd15" else 16 if not tiny else 4
        prefs = {"prompt": batch["prompt"], "index": batch["index"],
                 "latents": torch.randn(batch_size, channels, side, side, device=device)}  # fmt: skip
        with acc.autocast():
            acc.backward(cfg.objective.pref_weight * preference_loss(tr, prefs))
        tr.adapter.state.clear()
        peaks["preference term (one denoiser step with gradients, backward)"] = _peak(device)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        peaks["optimiser step"] = _peak(device)
        seconds = time.perf_counter() - started
        hypernet = sum(p.numel() for p in tr.predictor.hypernet.parameters())
        base = sum(p.numel() for m in tr.adapter.frozen() for p in m.parameters())
        reward = sum(p.numel() for p in tr.rewards.parameters())
        lines = [
            f"Preset `training/configs/{family}.yaml`: {cfg.model.resolution} px, batch {batch_size} per GPU, "
            f"{cfg.sampling.num_steps} sampling steps, guidance {cfg.sampling.guidance:g}, k = {int(metrics['k'])}, "
            f"{cfg.model.base_dtype} base, mixed precision {cfg.run.mixed_precision}, gradient checkpointing "
            f"{cfg.model.gradient_checkpointing}; base model {base / 1e9:.2f} B parameters, "
            f"reward {reward / 1e9:.2f} B, "
            f"hypernet {hypernet / 1e6:.1f} M ({len(tr.predictor.targets)} targets); one step took {seconds:.1f} s.",
            "",
        ]
        if not cuda:
            return lines + ["(CPU: no GPU memory figures; the step ran end to end)"]
        lines += [
            f"GiB allocated by this section's trainer (other sections' {already / GB:.2f} GiB left out):",
            "",
            "| what | GiB |",
            "|---|---|",
            f"| allocated before the step (weights, hypernet, optimiser state) | {weights / GB:.2f} |",
        ]
        lines += [f"| peak through the {name} | {(peak - already) / GB:.2f} |" for name, peak in peaks.items()]
        lines.append(
            f"| reserved by the caching allocator at the end | {torch.cuda.memory_reserved(device) / GB:.2f} |"
        )
        tr.adapter.detach()
        acc.end_training()
        return lines


def _peak(device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
