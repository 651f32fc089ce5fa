"""The SDXL family: UNet2DConditionModel with text-and-size conditioning (eps), two CLIP text encoders, VAE, DDIM.

What differs from SD1.5 (whose DDPM time, DDIM sampling and eps formulas it reuses):
- prompts: CLIP ViT-L (``CLIPTextModel``) and OpenCLIP ViT-bigG (``CLIPTextModelWithProjection``); their
  penultimate hidden states are concatenated into the (b, 77, 2048) cross-attention context, and the second one's
  projected pooled vector (b, 1280) joins the time embedding, as diffusers' SDXL pipeline and ComfyUI encode them;
- size and crop conditioning (``time_ids``: original height and width, crop top and left, target height and width)
  is (R, R, 0, 0, R, R) at the training resolution R: what ComfyUI uses when the conditioning does not say
  (width and height of the latent, no crop);
- the negative prompt is the encoding of "" (both the tokens and the pooled vector), as a ComfyUI graph has it
  from a text-encode node, not the zeros diffusers' pipeline substitutes (``force_zeros_for_empty_prompt``).

Any UNet with SDXL's structure loads (the real one or tiny ones): the table's numbers come from its config.
"""

from __future__ import annotations

import torch

from hyperalign.hypernet import feature_tokens
from hyperalign.targets import SDXL, XLUNetArch

from .models import Cond, FamilyAdapter, load_diffusers, load_transformers
from .sd15 import SD15Adapter, _uniform


def xl_unet_arch(config) -> XLUNetArch:
    """The target table's architecture numbers, read from a diffusers SDXL UNet2DConditionModel config."""
    if config.addition_embed_type != "text_time":
        raise ValueError(
            f"HyperAlign: the sdxl family needs a UNet with SDXL's text_time conditioning, got addition_embed_type "
            f"{config.addition_embed_type!r}. HINT: use model.family=sd15 for SD1.5-style UNets."
        )
    if config.mid_block_type != "UNetMidBlock2DCrossAttn":
        raise ValueError("HyperAlign: the UNet has no cross-attention middle block (the perception encoder's end).")
    if getattr(config, "reverse_transformer_layers_per_block", None) is not None:
        raise ValueError("HyperAlign: UNets with separate up-block transformer depths are not supported.")
    levels = len(config.block_out_channels)
    depth = config.transformer_layers_per_block
    depths = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    for level, kind in enumerate(config.down_block_types):
        depths[level] = _uniform(depths[level], "transformer depths within a level") if "CrossAttn" in kind else 0
    return XLUNetArch(
        block_channels=tuple(config.block_out_channels),
        transformer_depths=tuple(depths),
        mid_depth=_uniform(depth[-1] if isinstance(depth, (list, tuple)) else depth, "middle block depth"),
        layers_per_block=_uniform(config.layers_per_block, "layers_per_block"),
        context_dim=int(config.cross_attention_dim),
    )


def check_text_time(config, pooled_dim: int) -> None:
    """The UNet's text_time input must be the pooled text and six size values, as SDXL base conditions; the
    refiner's holds five (an aesthetic score in place of the target size), so its numbers do not add up."""
    expected = pooled_dim + 6 * int(config.addition_time_embed_dim)
    if int(config.projection_class_embeddings_input_dim) != expected:
        raise ValueError(
            f"HyperAlign: the UNet's text_time input is {config.projection_class_embeddings_input_dim} wide, but the "
            f"pooled text ({pooled_dim}) and six size values ({6 * config.addition_time_embed_dim}) make {expected}: "
            "this is not an SDXL base model (the SDXL refiner conditions on an aesthetic score instead). "
            "HINT: train on an SDXL base model or a fine-tune of it; the refiner is not supported."
        )


class _EncoderDone(Exception):
    """Raised by the middle block's hook: the perception encoder needs nothing after it."""


class SDXLAdapter(SD15Adapter):
    name = SDXL

    def __init__(self, cfg, device, dtype, unet, vae, encoders, tokenizers, scheduler_config):
        FamilyAdapter.__init__(self, cfg, device, dtype)  # SD1.5's own __init__ reads an SD1.5 table from the UNet
        self.denoiser, self.vae = unet, vae
        self.text_encoder, self.text_encoder_2 = encoders
        self.tokenizer, self.tokenizer_2 = tokenizers
        self.scheduler_config = scheduler_config
        if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                "HyperAlign: the sdxl family expects an epsilon-prediction model, got "
                f"prediction_type {scheduler_config['prediction_type']!r}."
            )
        self.arch = xl_unet_arch(unet.config)
        self.feature_dim = int(unet.config.block_out_channels[-1])
        self.context_dim = int(unet.config.cross_attention_dim)
        self.num_train_timesteps = int(scheduler_config["num_train_timesteps"])
        self.alphas = self._ddim(1).alphas_cumprod.to(self.device, torch.float32)  # (T,)

    @classmethod
    def load(cls, cfg, device, dtype) -> SDXLAdapter:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from .models import hub_kwargs

        unet = load_diffusers(UNet2DConditionModel, cfg, "unet", dtype).to(device)
        xl_unet_arch(unet.config)  # refuse a UNet of another family before loading the rest
        text_encoder_2 = load_transformers(CLIPTextModelWithProjection, cfg, "text_encoder_2", dtype).to(device)
        check_text_time(unet.config, int(text_encoder_2.config.projection_dim))  # the refiner has only this encoder
        vae = load_diffusers(AutoencoderKL, cfg, "vae", dtype).to(device)
        encoders = (load_transformers(CLIPTextModel, cfg, "text_encoder", dtype).to(device), text_encoder_2)
        tokenizers = tuple(load_transformers(CLIPTokenizer, cfg, name) for name in ("tokenizer", "tokenizer_2"))
        kwargs = {k: v for k, v in hub_kwargs(cfg).items() if k != "variant"}
        scheduler_config = dict(DDIMScheduler.load_config(cfg.path, subfolder="scheduler", **kwargs))
        return cls(cfg, device, dtype, unet, vae, encoders, tokenizers, scheduler_config)

    def frozen(self):
        return [self.denoiser, self.vae, self.text_encoder, self.text_encoder_2]

    # prompts -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed_xl(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 77, 768 + 1280) penultimate hidden states of both encoders, and the (b, 1280) pooled projection."""
        ids = self._tokens(self.tokenizer, prompts, self.tokenizer.model_max_length)
        ids_2 = self._tokens(self.tokenizer_2, prompts, self.tokenizer_2.model_max_length)
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        return torch.cat([hidden, out_2.hidden_states[-2]], dim=-1), out_2.text_embeds

    def encode_prompts(self, prompts: list[str], uncond: bool = True) -> Cond:
        context, pooled = self._embed_xl(prompts)
        tensors = {"pooled": pooled}
        if uncond:  # one negative row, repeated, as ComfyUI does (see SD15Adapter.encode_prompts)
            empty, empty_pooled = self._embed_xl([""])
            tensors["uncond"] = empty.repeat(len(prompts), 1, 1)
            tensors["uncond_pooled"] = empty_pooled.repeat(len(prompts), 1)
        return Cond(list(prompts), context, tensors)

    def time_ids(self, batch: int) -> torch.Tensor:
        """(b, 6) size and crop conditioning: original (h, w), crop (top, left), target (h, w)."""
        side = float(self.cfg.resolution)
        return torch.tensor([[side, side, 0.0, 0.0, side, side]], device=self.device).repeat(batch, 1)

    def _added(self, pooled: torch.Tensor) -> dict:
        return {"text_embeds": pooled.to(self.dtype), "time_ids": self.time_ids(pooled.shape[0]).to(self.dtype)}

    # model ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, hcfg, guidance: float = 1.0) -> torch.Tensor:
        """The frozen UNet's own forward (time, text and size embeddings, input blocks, middle block), stopped after
        the middle block, without LoRA."""
        with self.without_lora():  # the perception encoder sees the base model
            captured = []

            def capture(module, args, output):
                captured.append(output)
                raise _EncoderDone

            handle = self.denoiser.mid_block.register_forward_hook(capture)
            try:
                self.denoiser(
                    x.to(self.dtype),
                    t,
                    encoder_hidden_states=cond.context.to(self.dtype),
                    added_cond_kwargs=self._added(cond.tensors["pooled"]),
                )
            except _EncoderDone:
                pass
            finally:
                handle.remove()
            return feature_tokens(captured[0].float(), hcfg.feature_grid)  # (b, feature_dim, h/4, w/4) pooled

    def predict(self, x, t, cond: Cond, factors, guidance: float) -> torch.Tensor:
        """Guided eps for x (b, c, h, w); CFG runs cond and uncond rows in one call, sharing each sample's LoRA."""
        b = x.shape[0]
        cfg = guidance != 1.0 and "uncond" in cond.tensors
        x_in, t_in, context, pooled = x, t, cond.context, cond.tensors["pooled"]
        if cfg:
            x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
            context = torch.cat([cond.context, cond.tensors["uncond"]])
            pooled = torch.cat([pooled, cond.tensors["uncond_pooled"]])
        self._use(factors, x_in.shape[0], b)
        out = self.denoiser(
            x_in.to(self.dtype),
            t_in,
            encoder_hidden_states=context.to(self.dtype),
            added_cond_kwargs=self._added(pooled),
            return_dict=False,
        )[0].float()
        if cfg:
            eps_cond, eps_uncond = out.chunk(2)
            out = eps_uncond + guidance * (eps_cond - eps_uncond)
        return out
