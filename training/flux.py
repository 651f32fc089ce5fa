"""The FLUX family: FluxTransformer2DModel (velocity), CLIP-L + T5 text encoders, 16-channel VAE.

Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0, the one-step
clean prediction is x - sigma v and an Euler step is x + (sigma_next - sigma) v. FLUX.1-dev embeds
the guidance value (one forward per step); schnell has no guidance input. Latents stay (b, c, h, w)
here and are packed into 2x2 patch tokens only for the transformer call.
"""

from __future__ import annotations

import torch

from hyperalign.hypernet import feature_tokens
from hyperalign.schedule import progress_of_timestep
from hyperalign.targets import FLUX, DiTArch

from .models import Cond, FamilyAdapter, SamplingSteps, load_diffusers, load_transformers


def dit_arch(transformer) -> DiTArch:
    config = transformer.config
    hidden = int(config.num_attention_heads * config.attention_head_dim)
    blocks = transformer.single_transformer_blocks
    mlp_ratio = blocks[0].proj_mlp.out_features / hidden if len(blocks) else 4.0
    return DiTArch(
        hidden_size=hidden,
        depth=int(config.num_layers),
        depth_single_blocks=int(config.num_single_layers),
        mlp_ratio=mlp_ratio,
    )


def pack(x: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h/2 * w/2, 4c): 2x2 patches as tokens, the transformer's input layout."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """Rotary position ids (h/2 * w/2, 3) of the patch grid: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxAdapter(FamilyAdapter):
    name = FLUX

    def __init__(self, cfg, device, dtype, transformer, vae, clip, clip_tokenizer, t5, t5_tokenizer, scheduler):
        super().__init__(cfg, device, dtype)
        self.denoiser, self.vae = transformer, vae
        self.clip, self.clip_tokenizer, self.t5, self.t5_tokenizer = clip, clip_tokenizer, t5, t5_tokenizer
        self.flow_match = scheduler  # FlowMatchEulerDiscreteScheduler: only its (resolution-dependent) sigma shift
        self.arch = dit_arch(transformer)
        self.feature_dim = self.arch.hidden_size
        self.context_dim = int(transformer.config.pooled_projection_dim)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)

    @classmethod
    def load(cls, cfg, device, dtype) -> FluxAdapter:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        from .models import hub_kwargs

        transformer = load_diffusers(FluxTransformer2DModel, cfg, "transformer", dtype).to(device)
        vae = load_diffusers(AutoencoderKL, cfg, "vae", dtype).to(device)
        clip = load_transformers(CLIPTextModel, cfg, "text_encoder", dtype).to(device)
        t5 = load_transformers(T5EncoderModel, cfg, "text_encoder_2", dtype).to(device)
        clip_tokenizer = load_transformers(CLIPTokenizer, cfg, "tokenizer")
        t5_tokenizer = load_transformers(AutoTokenizer, cfg, "tokenizer_2")
        kwargs = {k: v for k, v in hub_kwargs(cfg).items() if k != "variant"}
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(cfg.path, subfolder="scheduler", **kwargs)
        return cls(cfg, device, dtype, transformer, vae, clip, clip_tokenizer, t5, t5_tokenizer, scheduler)

    def frozen(self):
        return [self.denoiser, self.vae, self.clip, self.t5]

    # prompts -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], uncond: bool = False) -> Cond:
        ids = self._tokens(self.clip_tokenizer, prompts, self.clip_tokenizer.model_max_length)
        pooled = self.clip(ids).pooler_output  # (b, 768)
        ids_t5 = self._tokens(self.t5_tokenizer, prompts, self.cfg.max_sequence_length)
        t5 = self.t5(ids_t5)[0]  # (b, L, 4096)
        # the hypernet's context is the pooled CLIP vector as one token: T5 padding differs between hosts
        return Cond(list(prompts), pooled[:, None, :], {"pooled": pooled, "t5": t5})

    # time ----------------------------------------------------------------------------------------
    def _mu(self) -> float | None:
        if not self.flow_match.config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        side = self.cfg.resolution // self.vae_scale
        c = self.flow_match.config
        return calculate_shift(
            (side // 2) ** 2,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )

    def _shifted(self, sigmas: list[float]) -> list[float]:
        """The scheduler's own (resolution-dependent) shift applied to `sigmas`; a terminal 0 is appended."""
        self.flow_match.set_timesteps(sigmas=sigmas, mu=self._mu())
        return [float(s) for s in self.flow_match.sigmas]

    def sampling_steps(self, num_steps: int) -> SamplingSteps:
        base = [1.0 - i / num_steps for i in range(num_steps)]  # linspace(1, 1/N, N), as the FLUX pipeline
        sigmas = self._shifted(base)
        t = sigmas[:-1]
        return SamplingSteps(t=t, progress=[self.progress(s) for s in t], sigmas=sigmas)

    def progress(self, sigma: float) -> float:
        return progress_of_timestep(float(sigma), None)

    def rows(self, cond: Cond, guidance: float, samples: int) -> int:
        return samples  # guidance is an input of the model (dev) or absent (schnell): one row per sample

    def timesteps(self, value: float, batch: int) -> torch.Tensor:
        return torch.full((batch,), float(value), device=self.device)

    # model ---------------------------------------------------------------------------------------
    def _guidance(self, guidance: float, batch: int):
        return torch.full((batch,), float(guidance), device=self.device) if self.guidance_embeds else None

    def _inputs(self, x, cond: Cond):
        _, _, h, w = x.shape
        txt_ids = torch.zeros(cond.tensors["t5"].shape[1], 3, device=self.device)
        return pack(x.to(self.dtype)), txt_ids, image_ids(h, w, self.device)

    @torch.no_grad()
    def features(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, hcfg, guidance: float) -> torch.Tensor:
        """Embedders, rotary embedding and the first `encoder_blocks` double blocks, without LoRA."""
        with self.without_lora():  # the perception encoder sees the base model
            model, dtype = self.denoiser, self.dtype
            b, _, h, w = x.shape
            packed, txt_ids, img_ids = self._inputs(x, cond)
            hidden = model.x_embedder(packed)
            pooled = cond.tensors["pooled"].to(dtype)
            guidance = self._guidance(guidance, b)
            if guidance is None:
                temb = model.time_text_embed(t.to(dtype) * 1000, pooled)
            else:
                temb = model.time_text_embed(t.to(dtype) * 1000, guidance.to(dtype) * 1000, pooled)
            text = model.context_embedder(cond.tensors["t5"].to(dtype))
            rotary = model.pos_embed(torch.cat([txt_ids, img_ids]))
            for block in model.transformer_blocks[: hcfg.encoder_blocks]:
                text, hidden = block(
                    hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary
                )
            grid = hidden.view(b, h // 2, w // 2, -1).permute(0, 3, 1, 2)  # (b, hidden, h/2, w/2)
            return feature_tokens(grid.float(), hcfg.feature_grid)

    def predict(self, x, t, cond: Cond, factors, guidance: float) -> torch.Tensor:
        """Velocity for x (b, c, h, w) with the embedded guidance value (dev) or none (schnell)."""
        b, _, h, w = x.shape
        packed, txt_ids, img_ids = self._inputs(x, cond)
        self._use(factors, b, b)
        out = self.denoiser(
            hidden_states=packed,
            encoder_hidden_states=cond.tensors["t5"].to(self.dtype),
            pooled_projections=cond.tensors["pooled"].to(self.dtype),
            timestep=t.to(self.dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=self._guidance(guidance, b),
            return_dict=False,
        )[0]
        return unpack(out.float(), h, w)

    def x0(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x - t.view(-1, 1, 1, 1) * v

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int, steps: SamplingSteps) -> torch.Tensor:
        return x + (steps.sigmas[i + 1] - steps.sigmas[i]) * v

    def noise_for_preference(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
        """Rectified-flow noising at the shifted sigma(u): returns x_t, sigma, progress and the velocity target."""
        sigma = torch.tensor(self._shifted(u.clamp(1e-3, 1.0).tolist())[:-1], device=self.device)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        return x_t, sigma, progress_of_timestep(sigma, None), noise - x0
