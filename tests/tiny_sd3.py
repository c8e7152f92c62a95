"""A tiny Stable Diffusion 3 (MMDiT transformer, VAE with a shift factor, two CLIP text encoders with projections, a
T5 encoder and their tokenizers) saved by `StableDiffusion3Pipeline.save_pretrained`, and a tiny Flux (a
guidance-distilled transformer, CLIP-L and T5) saved by `FluxPipeline.save_pretrained`, so that tests run the real
loading paths of the SD3 and Flux families; image-caption folders for them come from tests/tiny_sd.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, WORDS, make_caption_folder, write_tokenizer

MAX_SEQUENCE_LENGTH = 8  # T5 tokens per prompt in the tests (SD3: 256)
JOINT_DIM, POOLED_DIM = 32, 32  # the T5 width and the two CLIPs' projections, concatenated (16 + 16)


def t5_tokenizer() -> T5TokenizerFast:
    """A SentencePiece-style unigram tokenizer over the test captions' words and the letters, ending in </s>."""
    pieces = ["<pad>", "</s>", "<unk>", *(f"\u2581{w}" for w in WORDS), *"abcdefghijklmnopqrstuvwxyz,.-", "\u2581"]
    unigram = Tokenizer(models.Unigram([(p, -float(i)) for i, p in enumerate(pieces)], unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
        model_max_length=512,
    )  # fmt: skip


def clip_config(tokenizer, projection_dim: int = POOLED_DIM // 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def tiny_t5(tokenizer) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=JOINT_DIM, d_ff=64, d_kv=8, num_layers=2, num_heads=2,
                 relative_attention_num_buckets=8)
    )  # fmt: skip


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=IMAGE_SIZE, scaling_factor=1.5305, shift_factor=0.0609,  # SD3's VAE constants
    )  # fmt: skip


def make_tiny_sd3(folder: Path, *, seed: int = 0) -> Path:
    """A random tiny SD3 (8x8x4 latents of 64 px images, patch 2, 2 joint blocks) saved as a pipeline folder."""
    torch.manual_seed(seed)
    clip_tokenizer = write_tokenizer(folder.parent / f"{folder.name}_clip_tokenizer")
    tokenizer_3 = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=CLIPTextModelWithProjection(clip_config(clip_tokenizer)), tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(clip_tokenizer)), tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny_t5(tokenizer_3), tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def make_tiny_flux(folder: Path, *, seed: int = 0) -> Path:
    """A random tiny FLUX.1-dev-like model (guidance input, 1 double and 1 single block; 4-channel latents packed
    2x2 into 16-wide tokens) with FLUX.1's scheduler (resolution-dependent shift), saved as a FluxPipeline folder."""
    torch.manual_seed(seed)
    clip_tokenizer = write_tokenizer(folder.parent / f"{folder.name}_clip_tokenizer")
    tokenizer_2 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_vae(),
        text_encoder=CLIPTextModel(clip_config(clip_tokenizer)), tokenizer=clip_tokenizer,
        text_encoder_2=tiny_t5(tokenizer_2), tokenizer_2=tokenizer_2,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD3 folder and a folder of 6 captioned 64 px shape images; import it into a test module."""
    root = tmp_path_factory.mktemp("tiny_sd3")
    return {"pretrained": make_tiny_sd3(root / "pretrained"), "images": make_caption_folder(root / "images", 6)}


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> dict[str, Path]:
    """A tiny Flux folder and a folder of 6 captioned 64 px shape images; import it into a test module."""
    root = tmp_path_factory.mktemp("tiny_flux")
    return {"pretrained": make_tiny_flux(root / "pretrained"), "images": make_caption_folder(root / "images", 6)}
