"""A tiny Stable Diffusion 1.5 (UNet, VAE, CLIP text encoder, a small CLIP tokenizer vocabulary) saved as a diffusers
folder, and image-caption-control data for it, so that tests run the real loading paths of the SD family.

Run as a script, it is a probe around `launch/train.py` for the tests: every rank records fingerprints of the
frozen UNet, VAE and text encoder when they are loaded and after training, and whether DeepSpeed touched them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from data.shards import shard_name, write_manifest, write_shard

IMAGE_SIZE, LATENT_SIZE = 64, 8  # a 4-block VAE downsamples by 8, as SD's does
WORDS = ["a", "red", "blue", "circle", "square", "on", "black", "the", "image", "photo", "of", "high-quality,"]
CAPTIONS = ["a red circle", "a blue square on black", "the photo of a circle", "a square", ""]


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over letters (each also as a word end) with a few merges; 77 tokens like SD's."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(",.-")
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(ch + "</w>" for ch in letters)]
    merges = [("h", "e</w>"), ("t", "he</w>"), ("i", "r"), ("c", "ir")]
    vocab += ["".join(pair) for pair in merges]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_sd(folder: Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A random tiny SD 1.5 saved by StableDiffusionPipeline (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ with SD 1.5's scaled-linear PNDM schedule)."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder / "tokenizer_build")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )  # fmt: skip
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def shape_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A uint8 RGB image of a few filled shapes: clear edges for Canny."""
    import cv2

    image = np.full((size, size, 3), rng.integers(0, 80, 3), dtype=np.uint8)
    for _ in range(2):
        colour = tuple(int(c) for c in rng.integers(100, 256, 3))
        centre = tuple(int(c) for c in rng.integers(size // 4, 3 * size // 4, 2))
        if rng.random() < 0.5:
            cv2.circle(image, centre, int(rng.integers(size // 8, size // 3)), colour, -1)
        else:
            corner = tuple(int(c) for c in rng.integers(0, size, 2))
            cv2.rectangle(image, centre, corner, colour, -1)
    return image


def make_caption_folder(root: Path, num: int = 6, *, seed: int = 0, controls: bool = False) -> Path:
    """A folder of shape images with index.jsonl lines {"image", "caption"[, "control"]}."""
    from models.annotators import canny

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num):
        image = shape_image(rng)
        Image.fromarray(image).save(root / f"{i}.png")
        entry = {"image": f"{i}.png", "caption": CAPTIONS[i % len(CAPTIONS)]}
        if controls:
            Image.fromarray(canny(image)[..., 0]).save(root / f"{i}_control.png")
            entry["control"] = f"{i}_control.png"
        lines.append(json.dumps(entry))
    (root / "index.jsonl").write_text("\n".join(lines) + "\n")
    return root


def make_sd_shards(folder: Path, pretrained: Path, num_samples: int, *, per_shard: int = 8, seed: int = 0) -> Path:
    """Random latents, caption tokens and Canny controls of shape images, as the prepare job's shards hold."""
    from models.annotators import canny

    tokenizer = CLIPTokenizer.from_pretrained(pretrained / "tokenizer")
    rng = np.random.default_rng(seed)
    fields = {"x": "npy", "tokens": "npy", "control": "png"}
    samples = []
    for i in range(num_samples):
        tokens = tokenizer(CAPTIONS[i % len(CAPTIONS)], padding="max_length", max_length=77, truncation=True)
        samples.append({
            "x": rng.standard_normal((4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32),
            "tokens": np.asarray(tokens.input_ids, dtype=np.int32),
            "control": canny(shape_image(rng)),
        })  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    records = [
        write_shard(folder / shard_name(j), samples[first : first + per_shard], fields, first)
        for j, first in enumerate(range(0, num_samples, per_shard))
    ]
    write_manifest(folder, records, fields, {"kind": "test"})
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD 1.5 folder and target (12 samples) and bank (8) shard sets for it; import it into a test module."""
    return make_tiny_sd_set(tmp_path_factory.mktemp("tiny_sd"))


def make_tiny_sd_set(root: Path) -> dict[str, Path]:
    """The `tiny_sd` fixture's folders, made in `root` (also used by launch/gpu_check.py)."""
    pretrained = make_tiny_sd(root / "pretrained")
    return {
        "pretrained": pretrained,
        "target": make_sd_shards(root / "target", pretrained, 12, per_shard=8, seed=0),
        "bank": make_sd_shards(root / "bank", pretrained, 8, per_shard=8, seed=1),
        "root": root,
    }


SHM_DIR, SHM_BUFFER = Path("/dev/shm"), re.compile(r"deepspeed_allreduce_buffer_\d+_[\d.]+_(\d+)_\d+")


def shm_buffers() -> set[str]:
    return {p.name for p in SHM_DIR.glob("deepspeed_allreduce_buffer_*")} if SHM_DIR.is_dir() else set()


def live_master_ports() -> set[str]:
    ports = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            ports.update(re.findall(r"master_port[= ](\d+)", cmdline.read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, UnicodeDecodeError):
            pass
    return ports


@pytest.fixture(autouse=False)
def no_leaked_shm():
    """DeepSpeed's CPU all-reduce leaves a 69 MB /dev/shm buffer per rank of a multi-rank run that ends by os._exit
    (as our entry points do); hundreds of test runs fill the machine's memory. Removes those that appeared during the
    test and belong to no live launcher (their port is on no process's command line)."""
    before = shm_buffers()
    yield
    live = live_master_ports()
    for name in shm_buffers() - before:
        match = SHM_BUFFER.fullmatch(name)
        if match and match.group(1) not in live:
            (SHM_DIR / name).unlink(missing_ok=True)


def sd_train_args(tiny: dict[str, Path], run_dir: Path, *overrides: str) -> list[str]:
    return [
        "--config", "tiny_sd_cpu", f"model.pretrained={tiny['pretrained']}", f"data.target={tiny['target']}",
        f"data.bank={tiny['bank']}", f"run.dir={run_dir}", *overrides,
    ]  # fmt: skip


def fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(
            name.encode() + tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def frozen_report(family) -> dict:
    parts = {"unet": family.unet, "vae": family.vae, "text_encoder": family.text_encoder}
    return {
        name: {
            "sha256": fingerprint(module),
            "trainable": any(p.requires_grad for p in module.parameters()),
            "partitioned": any(hasattr(p, "ds_id") for p in module.parameters()),  # would mean ZeRO took it
            "training_mode": module.training,
        }
        for name, module in parts.items()
    }


def probe_main(out: Path, argv: list[str]) -> int:
    """launch/train.py with the family recorded: writes out/rank{R}.json with its frozen parts at load and after."""
    import trainer.loop
    from launch.train import main

    loaded = []
    original = trainer.loop.load_family

    def recording_load_family(cfg, *args, **kwargs):
        family = original(cfg, *args, **kwargs)
        loaded.append((family, frozen_report(family)))
        return family

    trainer.loop.load_family = recording_load_family
    status = main(argv)
    family, at_load = loaded[0]
    report = {"status": status, "at_load": at_load, "after": frozen_report(family)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report, indent=1))
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from launch.common import exit_process

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's, put first
    status = 1
    try:
        status = probe_main(Path(args[0]), args[1:])
    finally:  # also after an unexpected error: a rank stuck in teardown would keep the others waiting
        exit_process(status)
