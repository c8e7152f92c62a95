"""The Stable Diffusion 3 family: an MMDiT (`SD3Transformer2DModel`) trained by flow matching; the transformer trains.

Loads a local `StableDiffusion3Pipeline` folder (transformer/, vae/, scheduler/, text_encoder/ + tokenizer/ and
text_encoder_2/ + tokenizer_2/ (the two CLIPs), text_encoder_3/ + tokenizer_3/ (T5; optional with
model.sd3.t5=false)). The text encoders are frozen, so prompts are encoded once, when the data is prepared and the
bank generated (`encode_prompts`), and the shards hold their embeddings, as the trainers of SD3 cache them: a
training step runs no text encoder. They are loaded only when a prompt is encoded (and, once per run, to embed
the null prompt).

Conditions are (prompt embeddings, pooled embeddings); the null condition is the embedding of the null prompt
(model.sd3.null_prompt, "" by default: SD3's own unconditional prompt). The noise process is rectified flow
(`models/noise/flow.py`) with the folder's scheduler shift (SD3: 3.0) and logit-normal t, as SD3 trains.

Export: a `StableDiffusion3Pipeline` folder (the trained transformer beside the pre-trained parts), which
`StableDiffusion3Pipeline.from_pretrained` loads; LoRA adapters also as a diffusers LoRA file (`export_adapter`),
which `pipe.load_lora_weights` loads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from models.dit_weights import copy_into_parameter, open_weights, stream_into
from models.family import combined_sha256, to_device
from models.noise.flow import FlowMatchingProcess
from models.samplers import FLOW_SAMPLERS, flow_sampler
from models.vae import Generators, vae_decode, vae_downsampling, vae_encode

PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
NOISE_PROCESS_FILE = "noise_process.json"  # an export's record of the training distribution of t


@dataclass
class TextCondition:
    """What `predict` takes: the prompt's per-token embeddings and the pooled ones."""

    prompt_embeds: torch.Tensor  # (B, tokens, joint_attention_dim): SD3's 77 CLIP + T5's, Flux's T5 only
    pooled_embeds: torch.Tensor  # (B, pooled_projection_dim)


class SD3Family:
    name = "sd3"
    data_kind = "text"  # how its data is prepared and its bank generated (trainer/jobs/kinds/)
    condition_fields = ("prompt_embeds", "pooled_embeds")  # the shard fields `condition` reads
    # What another text-to-image flow transformer (Flux, `models/flux.py`) sets to reuse all of this family:
    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
    parts, t5_parts = PARTS, T5_PARTS  # the folders a pretrained folder must hold (T5's unless t5=false)
    t5_optional = True  # SD3's pipeline runs without T5 (model.sd3.t5=false)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")  # T5 last
    title = "Stable Diffusion 3"
    own_settings: tuple[str, ...] = ()  # settings of a subclass's config section beyond null_prompt, length and t5

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        vae: AutoencoderKL,
        folder: Path,
        process: FlowMatchingProcess,
        *,
        null_prompt: str = "",
        max_sequence_length: int = 256,
        t5: bool = True,
    ):
        self.transformer, self.vae = transformer, vae.eval().requires_grad_(False)
        self.folder, self.process = Path(folder), process
        self.folder_scheduler_config = _read_json(self.folder / "scheduler" / "scheduler_config.json")
        self.scheduler_config = self.sampling_config(self.folder_scheduler_config)
        self.null_prompt, self.max_sequence_length, self.t5 = null_prompt, max_sequence_length, t5
        self._encoder: StableDiffusion3Pipeline | None = None  # the text encoders, loaded when first needed
        self._fixed: dict[str, TextCondition] = {}  # the null and empty prompts, encoded once

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        num_classes: int = 0,
        null_prompt: str = "",
        max_sequence_length: int = 256,
        t5: bool = True,
        noise: object | None = None,
        build_context: Callable[[], AbstractContextManager] = nullcontext,
        load_parameter: Callable[[torch.nn.Parameter, torch.Tensor], None] = copy_into_parameter,
        **settings: Any,
    ) -> SD3Family:
        """`model.sd3`'s settings and the flow settings of `noise:`; the transformer is built empty under
        `build_context()` (deepspeed.zero.Init under ZeRO-3) and filled one tensor at a time. Other settings are
        the trainer's common ones (ignored) or a subclass's own (passed to its constructor)."""
        settings = {key: settings[key] for key in cls.own_settings if key in settings}
        if num_classes:
            raise ValueError(
                f"model.num_classes={num_classes}: {cls.name} is conditioned on prompts, not classes; leave it 0"
            )
        path = Path(pretrained)
        if not path.is_dir():
            raise FileNotFoundError(
                f"model.pretrained={pretrained} does not exist: point it to a local {cls.title} folder in diffusers "
                f"layout ({', '.join(p + '/' for p in cls.parts + cls.t5_parts)})"
            )
        missing = [part for part in cls.parts + (cls.t5_parts if t5 else ()) if not (path / part).is_dir()]
        if missing:
            hint = (
                f"; without T5, set model.{cls.name}.t5=false (the transformer then sees zeros for T5's tokens)"
                if set(missing) <= set(cls.t5_parts) and cls.t5_optional
                else f": is it a folder saved by {cls.pipeline_class.__name__}.save_pretrained?"
            )
            raise FileNotFoundError(f"model.pretrained={pretrained} has no {', '.join(p + '/' for p in missing)}{hint}")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"model.{cls.name}.max_sequence_length={max_sequence_length} must be in 1..512")
        source = open_weights(path / "transformer", 0, cls.transformer_class)
        try:
            with build_context():
                transformer = cls.transformer_class.from_config(source.config)
            stream_into(transformer, source, load_parameter)
        finally:
            source.close()
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
        recorded = _read_json(path / NOISE_PROCESS_FILE)  # an export of ours records the distribution of t
        vae = AutoencoderKL.from_pretrained(path / "vae")
        defaults = cls.default_time(scheduler, transformer, vae, settings)
        process = FlowMatchingProcess.from_settings(noise, {**defaults, **recorded})
        return cls(transformer, vae, path, process, null_prompt=null_prompt,
                   max_sequence_length=max_sequence_length, t5=t5, **settings)  # fmt: skip

    @staticmethod
    def default_time(scheduler_config: dict, transformer: torch.nn.Module, vae: AutoencoderKL, settings: dict) -> dict:
        """The training distribution of t where neither the folder nor `noise:` sets it: SD3's logit-normal (0, 1)
        shifted by its scheduler's shift (3.0)."""
        return {"shift": scheduler_config.get("shift", 1.0)}

    def sampling_config(self, folder_config: dict) -> dict:
        """The sampler's scheduler config: the folder's, shifted as the model trains (SD3: a fixed shift)."""
        return {**folder_config, "shift": self.process.time.shift}

    def export_scheduler_config(self) -> dict:
        """The scheduler an export carries: the sampler's (SD3: the training shift)."""
        return dict(self.scheduler_config)

    # --- what the trainer needs -------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def null_condition(self) -> TextCondition:
        return self.fixed_condition("null")

    @property
    def noise_process(self) -> FlowMatchingProcess:
        return self.process

    def condition(self, fields: dict[str, torch.Tensor], null_condition: torch.Tensor) -> TextCondition:
        """The slots' cached prompt embeddings, the null prompt's where the slot's condition is null (bank slots,
        dropout): a `where` on the device, so the step reads nothing back."""
        embeds, pooled = fields["prompt_embeds"].float(), fields["pooled_embeds"].float()
        null, null_mask = self.null_condition, to_device(null_condition, embeds.device)
        return TextCondition(
            torch.where(null_mask[:, None, None], null.prompt_embeds.to(embeds.device), embeds),
            torch.where(null_mask[:, None], null.pooled_embeds.to(pooled.device), pooled),
        )

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: TextCondition):
        """The velocity at flow timestep t (1000 times flow time), in x_t's dtype."""
        return denoiser(
            hidden_states=x_t, timestep=t, encoder_hidden_states=condition.prompt_embeds.to(x_t.dtype),
            pooled_projections=condition.pooled_embeds.to(x_t.dtype), return_dict=False,
        )[0]  # fmt: skip

    def tunable_parameters(self, denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in denoiser.parameters() if p.requires_grad]

    def place_frozen(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Moves the VAE to the training device, in the training precision, and embeds the null and empty prompts
        there (then frees the text encoders: a training step runs none; prepare and the bank load them again)."""
        self.vae.to(device, dtype)
        if self._encoder is not None:
            for module in self.text_modules():
                module.to(device)  # float32 whatever the training precision: the shards' embeddings are
        self._fixed = {which: self.fixed_condition(which) for which in ("null", "empty")}
        self._encoder = None

    def compile_blocks(self, **options) -> None:
        """torch.compile each joint transformer block in place (parameter names unchanged)."""
        for block in self.transformer.transformer_blocks:
            block.compile(**options)

    def denoiser_from_state_dict(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = self.transformer_class.from_config(self.transformer.config)
        model.load_state_dict(state_dict)
        return model.eval()

    def check_data(self, sample: dict, meta: dict, key: str) -> None:
        """A data set's cached embeddings must be this family's: the text settings its job recorded (`meta`) and the
        shapes of a sample's embeddings; otherwise the run would stop at its first step, or train on other prompts'
        embeddings without a word."""
        for setting in ("max_sequence_length", "t5"):
            recorded, ours = meta.get(setting), getattr(self, setting)
            if recorded is not None and recorded != ours:
                raise ValueError(
                    f"{key} was prepared with {setting}={recorded}, but model.{self.name}.{setting}={ours}: prepare "
                    f"it again, or set model.{self.name}.{setting}={recorded}"
                )
        for field, expected in zip(self.condition_fields, self.embedding_shapes()):
            got = tuple(np.shape(sample[field]))
            if got != expected:
                raise ValueError(
                    f"{key}: the samples' {field} have shape {got} but model.family={self.name} embeds prompts as "
                    f"{expected}: prepare the data (and the bank) with this model"
                )

    def embedding_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prompt_embeds, pooled_embeds) shapes of one prompt: SD3's 77 CLIP tokens, then T5's."""
        config = self.transformer.config
        return (77 + self.max_sequence_length, config.joint_attention_dim), (config.pooled_projection_dim,)

    # --- prompts ----------------------------------------------------------------------------------
    def text_encoders(self) -> StableDiffusion3Pipeline:
        """A pipeline of the frozen text encoders and tokenizers (and the transformer, whose config sizes T5's
        zeros without T5), on the VAE's device in float32, as the prompts are cached; loaded when first needed."""
        if self._encoder is None:
            parts = {name: None for name in self.t5_parts}
            self._encoder = self.pipeline_class.from_pretrained(
                self.folder, transformer=self.transformer, vae=None, **({} if self.t5 else parts)
            )
            for module in self.text_modules():
                module.eval().requires_grad_(False).to(self.vae.device)
        return self._encoder

    def text_modules(self) -> list[torch.nn.Module]:
        encoder = self.text_encoders()
        names = self.text_encoder_names if self.t5 else self.text_encoder_names[:-1]
        return [getattr(encoder, name) for name in names]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        """The prompts' embeddings as SD3's pipeline computes them (float32, on the text encoders' device)."""
        embeds, _, pooled, _ = self.text_encoders().encode_prompt(
            prompts, None, None, device=self.vae.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return TextCondition(embeds.float(), pooled.float())

    def fixed_condition(self, which: str) -> TextCondition:
        """(1, ...) embeddings of the null prompt ("null") or of the empty prompt, guidance's negative ("empty"),
        rounded as the shards store embeddings, so that a bank slot's null equals what the bank was made with."""
        if which not in self._fixed:
            prompt = self.null_prompt if which == "null" else ""
            encoded = self.encode_prompts([prompt])
            self._fixed[which] = TextCondition(*(as_stored(x) for x in (encoded.prompt_embeds, encoded.pooled_embeds)))
        return self._fixed[which]

    # --- model space, sampler and fingerprint ----------------------------------------------------
    @property
    def latent_downsampling(self) -> int:
        return vae_downsampling(self.vae)

    def encode(self, pixels: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """One sample of the VAE's posterior per image, shifted and scaled as SD3's pipeline does."""
        return vae_encode(self.vae, pixels, generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents)

    def frozen_fingerprint(self) -> str:
        """The VAE's and the text encoders' weights (the transformer is the part that trains)."""
        return combined_sha256([self.vae, *self.text_modules()])

    samplers = FLOW_SAMPLERS

    def sampling_scheduler(self, sampler: str = "euler"):
        """Euler over the shifted flow times (SD3's own sampler, what `sample` uses) or DPM-Solver++."""
        return flow_sampler(self.scheduler_config, sampler)

    def guided_epsilon(
        self,
        denoiser: torch.nn.Module | None,
        x_in: torch.Tensor,
        t: torch.Tensor,
        condition: TextCondition,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The velocity (float32) for the condition, guided against the empty prompt as SD3's pipeline is."""
        denoiser = self.transformer if denoiser is None else denoiser
        t_batch = torch.as_tensor(t, device=x_in.device).expand(len(x_in))
        if guidance_scale == 1.0:
            return self.predict(denoiser, x_in, t_batch, condition).float()
        empty = self.fixed_condition("empty")
        both = TextCondition(
            torch.cat([condition.prompt_embeds, empty.prompt_embeds.expand_as(condition.prompt_embeds)]),
            torch.cat([condition.pooled_embeds, empty.pooled_embeds.expand_as(condition.pooled_embeds)]),
        )
        cond, uncond = (
            self.predict(denoiser, torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), both).float().chunk(2)
        )
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def sample(
        self,
        denoiser: torch.nn.Module | None,
        condition: TextCondition,
        *,
        num_steps: int = 28,
        guidance_scale: float = 1.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        decode: bool = True,
    ) -> torch.Tensor:
        """Euler samples (deterministic) for the prompts' embeddings, from `noise` (or noise from `generator`);
        decoded to pixels in [-1, 1] if `decode`, else model-space latents. `denoiser` None: the pre-trained
        transformer."""
        scheduler = self.sampling_scheduler()
        self.set_timesteps(scheduler, num_steps)
        device = self.vae.device
        if noise is None:
            noise = torch.randn((len(condition.prompt_embeds), *self.sample_shape), generator=generator)
        x = noise.to(device)
        condition = TextCondition(condition.prompt_embeds.to(device), condition.pooled_embeds.to(device))
        for t in scheduler.timesteps:
            x = scheduler.step(self.guided_epsilon(denoiser, x, t, condition, guidance_scale), t, x).prev_sample
        return self.decode(x) if decode else x

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        scheduler.set_timesteps(num_steps)

    def preview(self, denoiser: torch.nn.Module, num_images: int, num_steps: int, seed: int = 0) -> torch.Tensor:
        """Samples of the null prompt (what the bank retains), for the grids logged during training."""
        null = self.null_condition
        condition = TextCondition(
            null.prompt_embeds.expand(num_images, -1, -1), null.pooled_embeds.expand(num_images, -1)
        )
        return self.sample(denoiser, condition, num_steps=num_steps, generator=torch.Generator().manual_seed(seed))

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, class_names: list[str] | None = None):
        """A StableDiffusion3Pipeline folder: the trained transformer, the scheduler with the training shift, the
        pre-trained VAE, text encoders and tokenizers (copied), and noise_process.json (the training distribution
        of t), which `from_pretrained` reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        parts = [
            p
            for p in self.parts + self.t5_parts
            if p not in ("transformer", "scheduler") and (self.folder / p).is_dir()
        ]
        for part in parts:
            shutil.copytree(self.folder / part, directory / part, dirs_exist_ok=True)
        shutil.copy2(self.folder / "model_index.json", directory / "model_index.json")
        self.denoiser_from_state_dict(state_dict).save_pretrained(directory / "transformer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.export_scheduler_config())
        scheduler.save_pretrained(directory / "scheduler")
        (directory / NOISE_PROCESS_FILE).write_text(json.dumps(self.process.settings(), indent=2))

    def export_adapter(self, adapter: dict[str, torch.Tensor], directory: Path) -> None:
        """A LoRA adapter (peft's names) as diffusers' LoRA file, which the pipeline's `load_lora_weights` loads
        onto the pre-trained transformer; peft's adapter_config.json beside it gives the rank and alpha. Other
        adapters (BitFit, DiffFit) have no such format: nothing is written."""
        if not any(".lora_" in key for key in adapter):
            return  # BitFit's or DiffFit's additions: peft's files only, the pipeline's LoRA loader cannot read them
        metadata = _read_json(Path(directory) / "adapter_config.json") or None
        self.pipeline_class.save_lora_weights(
            Path(directory), transformer_lora_layers=adapter, transformer_lora_adapter_metadata=metadata
        )


EMBEDDING_DTYPE = torch.float16  # how the shards store prompt embeddings (trainer/jobs/kinds/text.py)


def as_stored(embeddings: torch.Tensor) -> torch.Tensor:
    """Float32 embeddings rounded through the shards' storage dtype; a value that storage cannot hold is refused."""
    stored = embeddings.to(EMBEDDING_DTYPE)
    if not torch.isfinite(stored).all():
        raise ValueError(
            f"prompt embeddings up to {embeddings.abs().max():.3g} overflow {EMBEDDING_DTYPE} (max 65504): the text "
            "encoders' outputs cannot be cached as they are"
        )
    return stored.float()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
