"""A tiny Stable Diffusion 3 (MMDiT transformer, VAE with a shift factor, two CLIP text encoders with projections, a
T5 encoder and their tokenizers) saved by `StableDiffusion3Pipeline.save_pretrained`, so that tests run the real
loading paths of the SD3 family; image-caption folders for it come from tests/tiny_sd.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

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


def make_tiny_sd3(folder: Path, *, seed: int = 0) -> Path:
    """A random tiny SD3 (8x8x4 latents of 64 px images, patch 2, 2 joint blocks) saved as a pipeline folder."""
    torch.manual_seed(seed)
    clip_tokenizer = write_tokenizer(folder.parent / f"{folder.name}_clip_tokenizer")

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=POOLED_DIM // 2,
                bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )  # fmt: skip

    tokenizer_3 = t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_3), d_model=JOINT_DIM, d_ff=64, d_kv=8, num_layers=2, num_heads=2,
                 relative_attention_num_buckets=8)
    )  # fmt: skip
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=IMAGE_SIZE, scaling_factor=1.5305, shift_factor=0.0609,  # SD3's VAE constants
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(), tokenizer=clip_tokenizer, text_encoder_2=clip(), tokenizer_2=clip_tokenizer,
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD3 folder and a folder of 6 captioned 64 px shape images; import it into a test module."""
    root = tmp_path_factory.mktemp("tiny_sd3")
    return {"pretrained": make_tiny_sd3(root / "pretrained"), "images": make_caption_folder(root / "images", 6)}
