"""The shipped toy text-to-image model loads offline through diffusers/transformers and samples."""

import json

import pytest
import torch

import toyworld as toy
from hyperalign.lora import resolve_modules
from hyperalign.targets import build_table
from toyworld import nets, world
from toyworld.vocab import WordTokenizer

MAX_ASSET_BYTES = 16 * 1000 * 1000  # the toy world's budget


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(toy.MODEL_DIR), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_components_load_one_by_one_as_the_trainer_loads_them():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(toy.MODEL_DIR)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    assert unet.config.cross_attention_dim == text.config.hidden_size == nets.TEXT_WIDTH
    assert list(unet.config.down_block_types) == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
    assert list(unet.config.up_block_types) == ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]
    assert vae.config.latent_channels == unet.config.in_channels == 4
    assert tokenizer.model_max_length == 77
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    index = json.loads((toy.MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert all(p.suffix == ".safetensors" for p in toy.MODEL_DIR.rglob("*") if p.suffix in (".safetensors", ".bin"))


def test_attention_targets_of_the_arch_exist_in_the_unet(pipe):
    table = build_table("sd15", toy.unet_arch())
    targets = table.preset("attn")
    # 7 sites (2 down, 1 mid, 4 up: attention at the two lower levels) x attn1/attn2 x q, k, v, out
    assert len(targets) == 7 * 2 * 4
    assert len(resolve_modules(pipe.unet, targets, lambda t: t.id)) == len(targets)


def test_tokenizer_matches_the_reward_word_tokenizer():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(toy.MODEL_DIR), subfolder="tokenizer", local_files_only=True)
    vocab = json.loads((toy.MODEL_DIR / "tokenizer" / "vocab.json").read_text())
    prompts = [world.prompt_of(s) for s in world.all_specs()[::7]] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, WordTokenizer(vocab)(prompts))
    assert (ids[0] != tokenizer.eos_token_id).sum() == 1 + len(prompts[0].replace(",", " ,").split())


def test_pipeline_samples_have_the_right_shape(pipe):
    out = pipe(
        [
            "one large red circle in the center, white background",
            "three small blue triangles at the top, black background",
        ],
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        height=32,
        width=32,
    ).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()  # (the pipeline clamps to [0, 1] itself)
    assert out[0].mean() > out[1].mean()  # the prompt reaches the UNet: a white background is brighter than black


def test_vae_round_trips_renders_and_scaled_latents_are_unit_scale(pipe):
    specs = world.all_specs()[::150]
    images = world.to_tensor_images(world.render_batch(specs, [world.Style()] * len(specs), list(range(len(specs)))))
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        recon = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    assert latents.shape == (len(specs), 4, 16, 16)
    assert 0.5 < (latents * pipe.vae.config.scaling_factor).std().item() < 2.0
    assert (recon - images).abs().mean().item() < 0.08


def test_shipped_assets_stay_small():
    total = sum(p.stat().st_size for p in toy.ASSETS.rglob("*") if p.is_file())
    assert total < MAX_ASSET_BYTES, f"toy assets are {total / 2**20:.1f} MiB"
