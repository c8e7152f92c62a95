"""The Stable Diffusion 1.5 + ControlNet family: only the ControlNet trains.

Loads a local diffusers SD folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) and a ControlNet (a
local folder, or `ControlNetModel.from_unet`, as ControlNet starts). The frozen UNet, VAE and text encoder are
plain attributes of the family, never of the denoiser: DeepSpeed partitions, optimises and saves only the
module it is given, so under every ZeRO stage they stay whole, untouched and out of checkpoints.

Conditions are the caption's CLIP tokens (77 ints per sample, far smaller than embeddings) and the control
image (uint8 HWC, 3 channels); the null condition is the default prompt with the control kept, because the
bank's controls are annotated from its own images (METHOD.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from models.annotators import synthetic_controls
from models.family import combined_sha256, to_device
from models.noise.ddpm import DDPMProcess
from models.samplers import DDPM_SAMPLERS, ddpm_sampler
from models.vae import Generators, vae_decode, vae_downsampling, vae_encode

DEFAULT_PROMPT = "a high-quality, detailed, and professional image"  # ControlNet's, and the paper's bank prompt
PREVIEW_GUIDANCE = 7.5  # SD's usual classifier-free guidance, for the human-facing preview grids only
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class ControlCondition:
    """What `predict` takes: frozen text-encoder states and control images in [0, 1]."""

    text: torch.Tensor  # (B, 77, D)
    control: torch.Tensor  # (B, 3, H, W), H and W the image size (latent size x VAE factor)


class SDControlNetFamily:
    name = "sd_controlnet"
    data_kind = "controlnet"  # how its data is prepared and its bank generated (trainer/jobs/kinds/)
    condition_fields = ("tokens", "control")  # the shard fields `condition` reads

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        controlnet: ControlNetModel,
        scheduler_config: dict,
        default_prompt: str = DEFAULT_PROMPT,
    ):
        self.unet, self.vae, self.text_encoder = (m.eval().requires_grad_(False) for m in (unet, vae, text_encoder))
        self.tokenizer, self.controlnet = tokenizer, controlnet
        self.scheduler_config = dict(scheduler_config)
        self.default_prompt = default_prompt
        self.null_tokens = self.tokenize([default_prompt])[0]
        self.empty_tokens = self.tokenize([""])[0]  # SD's own unconditional prompt: the negative of guidance
        self._text_cache: dict[str, torch.Tensor] = {}  # the two fixed prompts' text states, encoded once

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        controlnet: str | None = None,
        default_prompt: str = DEFAULT_PROMPT,
        seed: int = 0,
        num_classes: int = 0,
        **_: Any,
    ) -> SDControlNetFamily:
        """`model.sd_controlnet`'s settings; the rest of that section (control, annotator, canny_thresholds) and the
        trainer's build options (zero.Init under ZeRO-3, which the ControlNet does not use) are for other parts."""
        if num_classes:
            raise ValueError(
                f"model.num_classes={num_classes}: sd_controlnet is conditioned on prompts, not classes; leave it 0"
            )
        path = Path(pretrained)
        if not path.is_dir():
            raise FileNotFoundError(
                f"model.pretrained={pretrained} does not exist: point it to a local Stable Diffusion 1.5 folder "
                f"in diffusers layout ({', '.join(p + '/' for p in PARTS)})"
            )
        missing = [part for part in PARTS if not (path / part).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"model.pretrained={pretrained} has no {', '.join(p + '/' for p in missing)}: "
                "is it a diffusers Stable Diffusion folder (as saved by StableDiffusionPipeline.save_pretrained)?"
            )
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(
                f"model.pretrained={pretrained}: its scheduler predicts {prediction!r}, but this family trains "
                "epsilon-prediction models only (the loss compares the output to the noise): use an epsilon model "
                "such as SD 1.5, not a v-prediction one (SD 2.x 768)"
            )
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        if controlnet is None:
            # The encoder is copied from the UNet and the zero convolutions start at 0, but the control embedding
            # is random: seeded, so that every rank (and every run with this seed) starts from the same weights.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = ControlNetModel.from_unet(unet)
        elif not (Path(controlnet) / "config.json").is_file():
            raise FileNotFoundError(
                f"model.sd_controlnet.controlnet={controlnet} is not a ControlNetModel folder (no config.json): "
                "point it to a local diffusers ControlNet, or set model.sd_controlnet.controlnet=null to start one "
                "from the UNet"
            )
        else:
            net = ControlNetModel.from_pretrained(controlnet)
        return cls(
            unet,
            AutoencoderKL.from_pretrained(path / "vae"),
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            CLIPTokenizer.from_pretrained(path / "tokenizer"),
            net,
            scheduler_config,
            default_prompt,
        )

    # --- what the trainer needs -------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.controlnet

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def image_size(self) -> int:
        """Pixels per side of images and controls: the latent size times the VAE's downsampling."""
        return self.sample_shape[-1] * self.latent_downsampling

    @property
    def null_condition(self) -> torch.Tensor:
        return self.null_tokens

    def betas(self) -> np.ndarray:
        return DDPMScheduler.from_config(self.scheduler_config).betas.double().numpy()

    @cached_property
    def noise_process(self) -> DDPMProcess:
        """SD's discrete DDPM process (epsilon prediction) over its scheduler's betas."""
        return DDPMProcess(self.betas())

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """CLIP token ids, padded and truncated to the tokenizer's length (77 for SD): (N, 77) int64."""
        length = self.tokenizer.model_max_length
        return self.tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        device = self.text_encoder.device
        return self.text_encoder(tokens.to(device).long())[0]

    def fixed_text(self, which: str) -> torch.Tensor:
        """(1, 77, D) text states of the default prompt ("null") or the empty prompt ("empty"): encoded once per
        placement of the text encoder, not at every step."""
        if which not in self._text_cache:
            tokens = self.null_tokens if which == "null" else self.empty_tokens
            self._text_cache[which] = self.encode_text(tokens[None])
        return self._text_cache[which]

    def condition(self, fields: dict[str, torch.Tensor], null_condition: torch.Tensor) -> ControlCondition:
        """Caption tokens, the default prompt's where the slot's condition is null (bank, dropout); the control
        image is kept in every case.

        Null slots take the cached default-prompt states. With `null_condition` on the host (the plan's mask), only
        the other slots run the text encoder; a mask on an accelerator is not read back (that would stall the
        step), so every slot is encoded there and the null ones replaced."""
        tokens = fields["tokens"].long()
        null_text = self.fixed_text("null")
        if null_condition.device.type == "cpu":
            text = null_text.expand(len(tokens), -1, -1).clone()
            captioned = torch.from_numpy(np.flatnonzero(~null_condition.numpy()))
            if len(captioned):
                rows = to_device(captioned, text.device)
                text[rows] = self.encode_text(tokens[rows.to(tokens.device)])
        else:
            null = null_condition.to(null_text.device)[:, None, None]
            text = torch.where(null, null_text, self.encode_text(tokens))
        return ControlCondition(text, control_tensor(fields["control"]))

    def predict(
        self, denoiser: torch.nn.Module | None, x_t: torch.Tensor, t: torch.Tensor, condition: ControlCondition
    ) -> torch.Tensor:
        """Epsilon of the frozen UNet with the ControlNet's residuals (none when `denoiser` is None: plain SD).
        The ControlNet runs in x_t's dtype (bf16 under DeepSpeed bf16), the UNet in its own."""
        dtype, residuals = self.unet.dtype, {}
        if denoiser is not None:
            down, mid = denoiser(
                x_t,
                t,
                encoder_hidden_states=condition.text.to(x_t.dtype),
                controlnet_cond=condition.control.to(x_t.device, x_t.dtype),
                return_dict=False,
            )
            residuals = dict(
                down_block_additional_residuals=[d.to(dtype) for d in down],
                mid_block_additional_residual=mid.to(dtype),
            )
        return self.unet(
            x_t.to(dtype), t, encoder_hidden_states=condition.text.to(dtype), return_dict=False, **residuals
        )[0]

    def tunable_parameters(self, denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in denoiser.parameters() if p.requires_grad]

    def place_frozen(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Moves the frozen UNet, VAE and text encoder to the device the ControlNet trains on, in the training
        precision (bf16 under train.precision=bf16: half the memory of their weights and activations)."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device, dtype)
        self._text_cache.clear()  # re-encoded where (and in the precision that) the text encoder now is

    def compile_blocks(self, **options) -> None:
        """torch.compile each ControlNet down block and its mid block in place (state dict unchanged)."""
        for block in [*self.controlnet.down_blocks, self.controlnet.mid_block]:
            block.compile(**options)  # torch.compile options, e.g. backend

    def denoiser_from_state_dict(self, state_dict: dict[str, torch.Tensor]) -> ControlNetModel:
        """A plain copy of the ControlNet with other weights (EMA, gathered raw weights)."""
        model = ControlNetModel.from_config(self.controlnet.config)
        model.load_state_dict(state_dict)
        return model.eval()

    # --- model space, sampler and fingerprint: what the data jobs and the evaluation use -------------
    @property
    def latent_downsampling(self) -> int:
        return vae_downsampling(self.vae)

    def encode(self, pixels: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """One scaled sample of the VAE's posterior per image."""
        return vae_encode(self.vae, pixels, generator)

    def frozen_fingerprint(self) -> str:
        """The frozen UNet's, VAE's and text encoder's weights (the ControlNet is the part that trains)."""
        return combined_sha256([self.unet, self.vae, self.text_encoder])

    # --- sampling and export ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        denoiser: torch.nn.Module | None,
        tokens: torch.Tensor,
        controls: torch.Tensor | None = None,
        *,
        num_steps: int = 50,
        guidance_scale: float = 1.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        decode: bool = True,
    ) -> torch.Tensor:
        """DDIM (eta 0) samples for prompt `tokens` and uint8 HWC `controls`, guided against the empty prompt
        with the control kept (as ControlNet samples). Without a ControlNet, plain SD (the bank's generator).
        Decoded to pixels in [-1, 1] if `decode`, else model-space latents."""
        scheduler = self.sampling_scheduler()
        scheduler.set_timesteps(num_steps)
        device = self.unet.device
        if noise is None:
            noise = torch.randn((len(tokens), *self.sample_shape), generator=generator)
        x = noise.to(device) * scheduler.init_noise_sigma
        control = None if controls is None else control_tensor(controls).to(device)
        condition = ControlCondition(self.encode_text(tokens), control)
        denoiser = denoiser if control is not None else None
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            x = scheduler.step(self.guided_epsilon(denoiser, x_in, t, condition, guidance_scale), t, x).prev_sample
        return self.decode(x) if decode else x

    samplers = DDPM_SAMPLERS

    def sampling_scheduler(self, sampler: str = "ddim"):
        """A diffusers scheduler over SD's schedule: DDIM (what `sample` steps with) or DPM-Solver++."""
        return ddpm_sampler(self.scheduler_config, sampler)

    def guided_epsilon(
        self,
        denoiser: torch.nn.Module | None,
        x_in: torch.Tensor,
        t: torch.Tensor,
        condition: ControlCondition,
        guidance_scale: float,
    ) -> torch.Tensor:
        """ε (float32) for the condition's text and control, guided against the empty prompt with the control kept
        (as ControlNet samples); plain SD when `denoiser` is None."""
        t_batch = torch.full((len(x_in),), int(t), device=x_in.device, dtype=torch.long)
        if guidance_scale == 1.0:
            return self.predict(denoiser, x_in, t_batch, condition).float()
        empty = self.fixed_text("empty").expand(len(x_in), -1, -1)
        control = None if condition.control is None else torch.cat([condition.control, condition.control])
        both = ControlCondition(torch.cat([condition.text, empty.to(condition.text.device)]), control)
        eps = self.predict(denoiser, torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), both).float()
        cond, uncond = eps.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (scaled by the VAE's scaling factor) to pixels in [-1, 1]."""
        return vae_decode(self.vae, latents)

    def preview(self, denoiser: torch.nn.Module, num_images: int, num_steps: int, seed: int = 0) -> torch.Tensor:
        """Default-prompt samples for fixed synthetic controls, each shown beside its control (for the grids
        logged during training; the convergence tracker measures on real validation controls)."""
        controls = torch.from_numpy(synthetic_controls(num_images, self.image_size, seed))
        tokens = self.null_tokens.expand(num_images, -1)
        generator = torch.Generator().manual_seed(seed)
        images = self.sample(
            denoiser, tokens, controls, num_steps=num_steps, guidance_scale=PREVIEW_GUIDANCE, generator=generator
        )
        return torch.cat([control_tensor(controls).to(images.device) * 2 - 1, images], dim=-1)

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, class_names: list[str] | None = None):
        """The ControlNet alone, as a diffusers folder: `ControlNetModel.from_pretrained(directory)` loads it and
        `StableDiffusionControlNetPipeline` runs it with the SD parts of model.pretrained."""
        self.denoiser_from_state_dict(state_dict).save_pretrained(Path(directory))

    def check_data(self, sample: dict, meta: dict, key: str) -> None:
        """Nothing beyond 'x': captions are stored as tokens and encoded by this family's own text encoder."""

    def export_adapter(self, adapter: dict[str, torch.Tensor], directory: Path) -> None:
        """Nothing beyond peft's files: diffusers' ControlNet pipelines load no LoRA into the ControlNet."""


def control_tensor(controls: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) control maps -> float (B, 3, H, W) in [0, 1], as ControlNet takes them."""
    return controls.permute(0, 3, 1, 2).float() / 255.0
