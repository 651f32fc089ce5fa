"""Tiny SD1.5, SDXL and FLUX models in diffusers format, tiny preference data, and config helpers.

The models are random and tiny (16x16 latents) but have the real architectures, so the trainer's
loaders, hooks, perception encoders and objectives run their real code paths on CPU. The CLIP
tokenizer is built from open_clip's bundled BPE vocabulary (the real CLIP vocabulary), offline.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RESOLUTION = 32  # tiny VAEs downsample 2x: 16x16 latents


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [
        symbols[b]
        for b in sorted(symbols, key=lambda b: (b not in printable, printable.index(b) if b in printable else b))
    ]


def clip_bpe_path() -> Path:
    """open_clip's bundled CLIP BPE merges, found without importing open_clip (a slow import)."""
    import importlib.util

    return Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


_TOKENIZER: list[Path] = []  # the first tokenizer written this session; later ones are copies


def write_clip_tokenizer(folder: Path) -> None:
    import shutil

    if _TOKENIZER and _TOKENIZER[0].is_dir():
        shutil.copytree(_TOKENIZER[0], folder, dirs_exist_ok=True)
        return
    _write_clip_tokenizer(folder)
    _TOKENIZER.append(folder)


def _write_clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = _byte_symbols()
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(str(folder))


def tiny_clip_text(hidden: int = 32, projection: bool = False):
    """A 2-layer CLIP text encoder; `projection`: with a text projection (CLIPTextModelWithProjection, SDXL's 2nd)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=RESOLUTION,
        **extra,
    )
    # A random decoder ends in a GroupNorm that hides most of what the latent does to global statistics such as
    # brightness; a larger gain there lets toy rewards (brightness, colour) respond, as a trained decoder's would.
    with torch.no_grad():
        vae.decoder.conv_norm_out.weight.mul_(3.0)
    return vae


def build_tiny_sd15(folder: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    with torch.no_grad():  # as for the VAE (tiny_vae): let the LoRA's effect on eps survive the last GroupNorm
        unet.conv_norm_out.weight.mul_(10.0)
    unet.save_pretrained(folder / "unet")
    tiny_vae(4, scaling_factor=0.18215).save_pretrained(folder / "vae")
    tiny_clip_text().save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer")
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        prediction_type="epsilon",
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


# A tiny UNet with SDXL's structure: no attention at the first level, deeper transformers further down and in the
# middle, linear projections in the transformers, text_time conditioning (pooled text + six 256-wide size embeddings,
# the width ComfyUI's SDXL hard-codes). Channels are multiples of 32 (ComfyUI's group norms), heads of 64 channels
# (ComfyUI's SDXL fixes that width; attention_head_dim is diffusers' legacy name for the number of heads).
TINY_SDXL_UNET = dict(
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 1, 2),
    use_linear_projection=True,
    cross_attention_dim=64,  # 32 + 32: both text encoders' hidden states
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=32 + 6 * 256,
)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "trained_betas": None,
}


def build_tiny_sdxl(folder: Path) -> Path:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, **TINY_SDXL_UNET)
    with torch.no_grad():  # as for SD1.5 (build_tiny_sd15)
        unet.conv_norm_out.weight.mul_(10.0)
    unet.save_pretrained(folder / "unet")
    tiny_vae(4, scaling_factor=0.13025).save_pretrained(folder / "vae")
    tiny_clip_text().save_pretrained(folder / "text_encoder")
    tiny_clip_text(projection=True).save_pretrained(folder / "text_encoder_2")
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def build_tiny_flux(folder: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).save_pretrained(folder / "transformer")
    tiny_vae(
        16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    ).save_pretrained(folder / "vae")
    tiny_clip_text().save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer")
    T5EncoderModel(
        T5Config(
            vocab_size=49408, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8
        )
    ).save_pretrained(folder / "text_encoder_2")
    write_clip_tokenizer(folder / "tokenizer_2")  # any tokenizer loads through AutoTokenizer; T5's needs a spm file
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return folder


def build_prefs(folder: Path, count: int = 6) -> Path:
    """A local preference folder: pairs.jsonl + PNGs, one colour family per row; prompts.txt."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        chosen = Image.new("RGB", (40, 48), (200, 40 + 20 * i, 30))
        rejected = Image.new("RGB", (40, 48), (20, 20, 200))
        chosen.save(folder / "img" / f"{i}_a.png")
        rejected.save(folder / "img" / f"{i}_b.png")
        rows.append({"prompt": f"a red square number {i}", "chosen": f"img/{i}_a.png", "rejected": f"img/{i}_b.png"})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "prompts.txt").write_text("a cat\na dog\na lighthouse at night\na bowl of fruit\n")
    return folder


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="session")
def prefs(tmp_path_factory) -> Path:
    return build_prefs(tmp_path_factory.mktemp("prefs"))


def tiny_overrides(model: Path, prefs: Path, out: Path, family: str = "sd15") -> list[str]:
    """Overrides that turn a shipped preset into a seconds-long CPU run on the tiny models."""
    return [
        f"model.family={family!r}",
        f"model.path={str(model)!r}",
        "model.base_dtype='fp32'",
        f"model.resolution={RESOLUTION}",
        "model.max_sequence_length=16",
        "model.gradient_checkpointing=True",
        "hypernet.dim=32",
        "hypernet.depth=1",
        "hypernet.heads=2",
        "hypernet.rank=2",
        "hypernet.basis=4",
        "hypernet.feature_grid=4",
        "hypernet.encoder_blocks=1",
        "sampling.num_steps=4",
        f"sampling.guidance={3.5 if family == 'flux' else 2.0}",
        "data.preference='local'",
        f"data.path={str(prefs / 'pairs.jsonl')!r}",
        f"data.prompts={str(prefs / 'prompts.txt')!r}",
        "data.num_workers=0",
        "rewards=[{'name': 'brightness'}]",
        "optim.batch_size=2",
        "optim.max_steps=4",
        "optim.lr=1e-3",
        f"run.output_dir={str(out)!r}",
        "run.name='run'",
        "run.mixed_precision='no'",
        "run.report_to='none'",
        "run.cpu=True",
        "run.progress=False",
        "run.log_every=1",
        "run.sample_every=0",
        "run.save_every=100",
        "run.sample_prompts=['a cat']",
        "run.sample_seeds=[0]",
    ]


def run_module(
    module: str, args: list[str], launcher: list[str] | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `python -m module args` (or under `launcher`, e.g. torchrun) from the repo root."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = (launcher or [sys.executable]) + ["-m", module] + args
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; in-process runs with other settings need them cleared."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def tiny_config(model: Path, prefs: Path, out: Path, family: str = "sd15", extra: list[str] = ()):
    from training.config import load_config

    return load_config(None, tiny_overrides(model, prefs, out, family) + list(extra))


def build_trainer(cfg):
    """An in-process trainer on the tiny model (call inside the fresh_accelerate fixture)."""
    from training.engine import build, make_accelerator

    return build(cfg, make_accelerator(cfg))
