"""Per-GPU memory of a training run, planned without weights: "will DiT-XL/2 at micro-batch 64 fit on 8x80 GB?".

The model is built on the meta device (shapes only). Parameter counts come from the module; activations are
the tensors autograd saves for the backward pass of one forward on meta tensors (seen through
`saved_tensors_hooks`, each storage counted once, parameters excluded), with and without activation checkpointing
applied by the trainer's own `apply_activation_checkpointing` (the trained denoiser only: SD's frozen UNet keeps its
activations). Attention is counted as a flash kernel saves it (q, k, v, output,
log-sum-exp): on meta, `scaled_dot_product_attention` would take the math path and save the whole score
matrix, which no GPU kernel keeps.

Model states per rank, N the trained parameters, W the world size, p the bytes of the training precision:
weights p*N (/W at ZeRO-3) plus the frozen parts (SD's UNet, VAE, text encoder) whole, in the training
precision; gradients p*N (/W from ZeRO-2); an fp32 master 4*N/W from ZeRO-1 (DeepSpeed clones the partition
in fp32 too: ZeRO-3's no-copy branch compares a torch.device with a string and never matches); AdamW's two
moments 8*N (/W from ZeRO-1); the EMA 4*N (/W from ZeRO-1, the sharded EMA beside the fp32 partition).
DeepSpeed's buffers, sized by trainer.engine.ZERO_BUFFERS (elements): from ZeRO-1 the gradient reduce bucket
(p bytes each) and the step's fp32 flat copy of the rank's gradient partition (4*N/W; under ZeRO-3 one
sub-group at a time), and under ZeRO-3 the gathered whole parameters it keeps alive (up to its live-parameter
limit). The total counts gradients and activations whole at once, as under gradient accumulation; with one
micro-step per step the real peak is lower by up to the smaller of the two.
Not counted in the total: the CUDA context, NCCL's buffers, the allocator's cache and fragmentation, and the
optimizer step's temporaries. "Fits" reserves the first three (see `fit_margin_bytes`) and states the margin left.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch.overrides import TorchFunctionMode
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.engine import ZERO_BUFFERS
from trainer.setup import apply_activation_checkpointing

GIB = 2**30
# What a GPU holds besides the plan's tensors, reserved before a plan "fits": the CUDA context with the cuBLAS and
# cuDNN workspaces (0.5-1 GiB on recent GPUs and CUDA; the upper end), NCCL's communicator buffers (with more than
# one rank; more with NVLink SHARP) and the caching allocator's fragmentation, a share of the planned total.
CUDA_CONTEXT_GIB = 1.0
NCCL_BUFFERS_GIB = 0.5
FRAGMENTATION = 0.10
PRECISION_BYTES = {"fp32": 4, "bf16": 2}
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}

# diffusers' DiT-XL/2 at 256 px (DiTPipeline "facebook/DiT-XL-2-256"): 28 blocks of 16 heads x 72, patch 2.
DIT_XL2 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
    patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
)  # fmt: skip
# Stable Diffusion 1.5's public UNet, VAE and CLIP ViT-L/14 text encoder configs (512 px, 64x64x4 latents).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)  # fmt: skip
CLIP_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)  # fmt: skip

# The flow-matching transformers people fine-tune today, from their public configs: FLUX.1-dev (1024 px: 128x128x16
# latents packed 2x2 into 4096 tokens of 64, 512 T5 tokens) and SD3.5-large (1024 px: 128x128x16 latents, 77 CLIP +
# 256 T5 tokens). Their text encoders (T5-XXL, CLIPs) are frozen: prompts are encoded once at prepare time and the
# embeddings cached in the shards, so they are not resident while training; the VAE is (previews, the bank).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
VAE_16_CHANNELS = dict(SD15_VAE, latent_channels=16, sample_size=1024)


@dataclass
class PlanModel:
    """A model built on the meta device: what trains, what stays frozen, and one forward of the training step."""

    name: str
    trained: torch.nn.Module
    frozen: list[torch.nn.Module]
    forward: Callable[[int, torch.dtype], torch.Tensor]  # (micro-batch, dtype) -> output whose backward trains


def dit_plan_model(config: dict, name: str = "DiT") -> PlanModel:
    with torch.device("meta"):
        model = DiTTransformer2DModel(**config)
    c = model.config

    def forward(batch: int, dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(batch, c.in_channels, c.sample_size, c.sample_size, device="meta", dtype=dtype)
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        return model(x, timestep=t, class_labels=t).sample

    return PlanModel(name, model, [], forward)


def sd_controlnet_plan_model(unet: UNet2DConditionModel, vae_config: dict, text_config: dict, name: str) -> PlanModel:
    """Only the ControlNet trains; gradients flow back through the frozen UNet to its residuals, so the UNet's
    activations are saved too. The text encoder runs without gradients (its states are an input here)."""
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(unet)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    unet.requires_grad_(False)
    size = unet.config.sample_size
    image_size = size * 2 ** (len(vae.config.block_out_channels) - 1)

    def forward(batch: int, dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(batch, unet.config.in_channels, size, size, device="meta", dtype=dtype)
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        text = torch.empty(batch, 77, text_encoder.config.hidden_size, device="meta", dtype=dtype)
        control = torch.empty(batch, 3, image_size, image_size, device="meta", dtype=dtype)
        down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        return unet(
            x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=False,
        )[0]  # fmt: skip

    return PlanModel(name, controlnet, [unet, vae, text_encoder], forward)


def flow_transformer_plan_model(spec: str) -> PlanModel:
    """FLUX.1-dev (`flux-12b`) or SD3.5-large (`sd35-large`) at 1024 px, the whole transformer trained, the 16-channel
    VAE frozen; text embeddings come from the shards (see FLUX_DEV)."""
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_16_CHANNELS)
        if spec == "flux-12b":
            model = FluxTransformer2DModel(**FLUX_DEV)
        else:
            model = SD3Transformer2DModel(**SD35_LARGE)

    def forward(batch: int, dtype: torch.dtype) -> torch.Tensor:
        def empty(*shape):
            return torch.empty(*shape, device="meta", dtype=dtype)

        t = torch.zeros(batch, device="meta", dtype=dtype)
        if spec == "flux-12b":
            image, text = 64 * 64, 512
            ids = torch.zeros(image, 3, device="meta"), torch.zeros(text, 3, device="meta")
            return model(
                empty(batch, image, 64), encoder_hidden_states=empty(batch, text, 4096),
                pooled_projections=empty(batch, 768), timestep=t, img_ids=ids[0], txt_ids=ids[1], guidance=t,
            ).sample  # fmt: skip
        return model(
            empty(batch, 16, 128, 128), encoder_hidden_states=empty(batch, 77 + 256, 4096),
            pooled_projections=empty(batch, 2048), timestep=t,
        ).sample  # fmt: skip

    name = "FLUX.1-dev 12B 1024px" if spec == "flux-12b" else "SD3.5-large 8B 1024px"
    return PlanModel(name, model, [vae], forward)


def build_plan_model(spec: str) -> PlanModel:
    """`dit-xl2`, `sd15-controlnet`, `flux-12b`, `sd35-large`, or a local diffusers folder (a DiT transformer, a
    DiTPipeline, or an SD pipeline folder with unet/, vae/ and text_encoder/); only config.json files are read."""
    if spec == "dit-xl2":
        return dit_plan_model(DIT_XL2, "DiT-XL/2 256px")
    if spec in ("flux-12b", "sd35-large"):
        return flow_transformer_plan_model(spec)
    if spec == "sd15-controlnet":
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SD15_UNET)
        return sd_controlnet_plan_model(unet, SD15_VAE, CLIP_L14_TEXT, "SD1.5 + ControlNet 512px")
    path = Path(spec)
    if (path / "unet" / "config.json").is_file():
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
        vae_config = dict(AutoencoderKL.load_config(path / "vae"))
        text_config = json.loads((path / "text_encoder" / "config.json").read_text())
        keys = CLIP_L14_TEXT.keys() | {"bos_token_id", "eos_token_id", "pad_token_id", "num_hidden_layers"}
        vae_keys = SD15_VAE.keys() | {"norm_num_groups"}
        return sd_controlnet_plan_model(
            unet, {k: v for k, v in vae_config.items() if k in vae_keys},
            {k: v for k, v in text_config.items() if k in keys}, f"{path} + ControlNet",
        )  # fmt: skip
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    if (folder / "config.json").is_file():
        config = DiTTransformer2DModel.load_config(folder)
        return dit_plan_model({k: v for k, v in config.items() if not k.startswith("_")}, str(path))
    raise FileNotFoundError(
        f"--model {spec}: not a built-in spec (dit-xl2, sd15-controlnet, flux-12b, sd35-large) nor a local diffusers "
        "folder with config.json (a DiT transformer/ or an SD pipeline with unet/): pass one of those"
    )


class _FlashAttentionOnMeta(TorchFunctionMode):
    """Routes unmasked SDPA to the flash kernel, whose backward saves O(tokens) statistics, not the scores."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            # positional (DiT, SD) or by keyword (diffusers' attention dispatcher: Flux, SD3)
            qkv = list(args[:3]) + [
                kwargs.pop(name) for name in ("query", "key", "value")[len(args[:3]) :] if name in kwargs
            ]
            if len(qkv) == 3 and len(args) <= 3 and kwargs.get("attn_mask") is None and not kwargs.get("enable_gqa"):
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    *qkv, dropout_p=kwargs.get("dropout_p", 0.0), is_causal=kwargs.get("is_causal", False),
                    scale=kwargs.get("scale"),
                )[0]  # fmt: skip
            args = tuple(qkv) + tuple(args[3:])
        return func(*args, **kwargs)


def activation_bytes(model: PlanModel, micro_batch_size: int, precision: str, checkpointing: bool) -> int:
    """Bytes autograd keeps for the backward of one micro-batch (the output included), each storage once.

    With checkpointing (as the trainer applies it: `apply_activation_checkpointing` on the trained module), the
    kept block inputs plus the largest block's own activations, which its recomputation holds during the backward."""
    for module in (model.trained, *model.frozen):
        module.to(PRECISION_DTYPE[precision]).train()
    weights = {t.untyped_storage()._cdata for m in (model.trained, *model.frozen) for t in _tensors(m)}
    saved: dict[int, int] = {}
    windows = [0]

    def collector(into: dict[int, int]):
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in weights:
                into[storage._cdata] = storage.nbytes()
            return tensor

        return pack

    def checkpoint_measuring_recompute(block, *args):
        recomputed: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(collector(recomputed), lambda tensor: tensor):
            block(*args)  # meta: costs nothing; the same forward the backward will recompute
        windows.append(sum(recomputed.values()))
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    apply_activation_checkpointing(model.trained, checkpointing, checkpoint_measuring_recompute)
    with torch.autograd.graph.saved_tensors_hooks(collector(saved), lambda tensor: tensor), _FlashAttentionOnMeta():
        output = model.forward(micro_batch_size, PRECISION_DTYPE[precision])
    saved.setdefault(output.untyped_storage()._cdata, output.untyped_storage().nbytes())
    return sum(saved.values()) + max(windows)


def _tensors(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()


@dataclass
class MemoryPlan:
    """Bytes per rank, by what holds them."""

    weights: int
    gradients: int
    master: int  # ZeRO's fp32 copy of the rank's partition of the trained weights
    optimizer: int  # AdamW's exp_avg and exp_avg_sq, fp32
    ema: int
    buffers: int  # DeepSpeed's: reduce bucket, step-time fp32 gradient copy, ZeRO-3 gathered parameters
    activations: int

    @property
    def total(self) -> int:
        return sum(vars(self).values())


def plan_memory(
    model: PlanModel, *, world_size: int, zero_stage: int, precision: str, micro_batch_size: int,
    checkpointing: bool, activations: int | None = None,
) -> MemoryPlan:  # fmt: skip
    """Per-rank memory of model states and of one micro-batch's activations (see the module docstring)."""
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision={precision!r}: use one of {tuple(PRECISION_BYTES)}")
    if not 0 <= zero_stage <= 3:
        raise ValueError(f"zero_stage={zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
    p = PRECISION_BYTES[precision]
    trained = sum(t.numel() for t in model.trained.parameters() if t.requires_grad)
    fixed = sum(t.numel() * p for t in _tensors(model.trained) if not t.requires_grad)  # buffers, frozen rows
    fixed += sum(t.numel() * p for m in model.frozen for t in _tensors(m))
    shards = {stage: world_size if zero_stage >= stage else 1 for stage in (1, 2, 3)}
    bf16 = precision == "bf16"
    if activations is None:
        activations = activation_bytes(model, micro_batch_size, precision, checkpointing)
    return MemoryPlan(
        weights=p * trained // shards[3] + fixed,
        gradients=p * trained // shards[2],
        master=4 * trained // shards[1] if zero_stage >= 1 or bf16 else 0,
        optimizer=8 * trained // shards[1],
        ema=4 * trained // shards[1],
        buffers=deepspeed_buffer_bytes(trained, world_size, zero_stage, p),
        activations=activations,
    )


def deepspeed_buffer_bytes(trained: int, world_size: int, zero_stage: int, precision_bytes: int) -> int:
    """What DeepSpeed's ZeRO optimizer allocates beyond the model states (see the module docstring)."""
    if zero_stage == 0:
        return 0
    bucket = precision_bytes * ZERO_BUFFERS["reduce_bucket_size"]
    if zero_stage < 3:
        return bucket + 4 * trained // world_size
    step_copy = 4 * min(trained, ZERO_BUFFERS["sub_group_size"]) // world_size
    gathered = precision_bytes * min(trained, ZERO_BUFFERS["stage3_max_live_parameters"])
    return bucket + step_copy + gathered


def reserved_bytes(total: int, world_size: int) -> float:
    """What the GPU needs beyond the plan's `total`: CUDA context, NCCL buffers (several ranks), fragmentation."""
    nccl = NCCL_BUFFERS_GIB if world_size > 1 else 0.0
    return (CUDA_CONTEXT_GIB + nccl) * GIB + FRAGMENTATION * total


def fit_margin_bytes(total: int, world_size: int, gpu_memory_gib: float) -> float:
    """Bytes left on a GPU of `gpu_memory_gib` once the plan and the reserve are placed; the plan fits if >= 0."""
    return gpu_memory_gib * GIB - total - reserved_bytes(total, world_size)


def plan_table(
    spec: str, *, world_size: int, zero_stages: list[int], precision: str, micro_batch_size: int,
    checkpointing: list[bool], gpu_memory_gb: float,
) -> tuple[str, list[dict]]:  # fmt: skip
    """The printed table and its rows (GiB per rank) for every ZeRO stage x checkpointing choice."""
    model = build_plan_model(spec)
    trained = sum(t.numel() for t in model.trained.parameters() if t.requires_grad)
    frozen = sum(t.numel() for m in model.frozen for t in m.parameters())
    lines = [
        f"{model.name}: {trained / 1e6:.1f}M trained parameters, {frozen / 1e6:.1f}M frozen; {world_size} GPUs, "
        f"{precision}, micro-batch {micro_batch_size}; GiB per GPU of {gpu_memory_gb:g} GiB; margin = GPU - total - "
        f"reserve (CUDA context {CUDA_CONTEXT_GIB:g}"
        + (f" + NCCL buffers {NCCL_BUFFERS_GIB:g}" if world_size > 1 else "")
        + f" GiB + fragmentation {FRAGMENTATION:.0%} of total); fits = margin >= 0",
        f"{'ZeRO':>4} {'ckpt':>4} {'weights':>8} {'grads':>8} {'master':>8} {'optim':>8} {'EMA':>8} "
        f"{'DS buf.':>8} {'activ.':>8} {'total':>8} {'reserve':>8} {'margin':>8}  fits",
    ]
    rows = []
    for use_checkpointing in checkpointing:
        activations = activation_bytes(model, micro_batch_size, precision, use_checkpointing)
        for stage in zero_stages:
            plan = plan_memory(
                model, world_size=world_size, zero_stage=stage, precision=precision,
                micro_batch_size=micro_batch_size, checkpointing=use_checkpointing, activations=activations,
            )  # fmt: skip
            margin = fit_margin_bytes(plan.total, world_size, gpu_memory_gb)
            fits = margin >= 0
            reserve = reserved_bytes(plan.total, world_size)
            gib = {k: v / GIB for k, v in asdict(plan).items()}
            gib |= {"total": plan.total / GIB, "reserve": reserve / GIB, "margin": margin / GIB}
            rows.append({"model": model.name, "world_size": world_size, "zero_stage": stage, "precision": precision,
                         "micro_batch_size": micro_batch_size, "checkpointing": use_checkpointing, "fits": fits,
                         "gpu_memory_gb": gpu_memory_gb, **{f"{k}_gib": v for k, v in gib.items()}})  # fmt: skip
            states = ("weights", "gradients", "master", "optimizer", "ema", "buffers")
            values = " ".join(f"{gib[k]:8.2f}" for k in states)
            lines.append(
                f"{stage:>4} {'yes' if use_checkpointing else 'no':>4} {values} {gib['activations']:8.2f} "
                f"{gib['total']:8.2f} {gib['reserve']:8.2f} {gib['margin']:8.2f}  {'yes' if fits else 'NO'}"
            )
    return "\n".join(lines), rows
