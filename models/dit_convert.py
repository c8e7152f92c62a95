"""Load original facebookresearch/DiT checkpoints into diffusers' ``DiTTransformer2DModel``.

The original release (``DiT-XL-2-256x256.pt``) is a plain state dict with the research repo's module
names; diffusers lays the same network out differently:

* one timestep+label embedder in the original, one copy per transformer block in diffusers
  (``transformer_blocks.{i}.norm1.emb``); the final layer reads block 0's copy;
* a fused ``qkv`` projection in the original, separate ``to_q``/``to_k``/``to_v`` in diffusers
  (rows of ``qkv`` are ordered q, k, v, each head-major, so a plain 3-way split along dim 0 works);
* the adaLN chunk orders agree (blocks: shift/scale/gate for attention then for the MLP; final
  layer: shift, scale), so the modulation linears copy over unchanged;
* the fixed sin-cos ``pos_embed`` is a non-persistent buffer diffusers recomputes, so it is only used
  to infer the latent size (and checked against diffusers' own table).

One numerical difference is not a weight: diffusers' DiT builds its 256-dim sinusoidal timestep
features with ``downscale_freq_shift=1`` (frequencies ``10000**(-i/127)``) while the original uses
``10000**(-i/128)``. ``use_original_timestep_frequencies`` switches a model to the original
frequencies; it is a runtime attribute, not part of the diffusers config, so it has to be applied
again after ``DiTTransformer2DModel.from_pretrained``.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTTransformer2DModel

logger = logging.getLogger(__name__)

# Width of the sinusoidal timestep features; fixed in both implementations.
_TIME_FREQ_DIM = 256
# diffusers' DiT exposes no MLP-ratio setting: FeedForward always uses 4x the hidden size.
_MLP_RATIO = 4
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
)

# Per-block renames that are a straight copy (the fused qkv is handled separately).
_BLOCK_RENAMES = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_TOP_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
# The shared embedder, copied into every block.
_EMBEDDER_RENAMES = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}


def _check_is_dit(state_dict: Any, source: str) -> None:
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{source} is not an original DiT checkpoint: expected a state dict (or a dict with an "
            f"'ema'/'model' state dict), got {type(state_dict).__name__}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(
            f"{source} is not an original facebookresearch/DiT state dict: missing {', '.join(missing)} "
            "(expected keys like x_embedder.proj.weight, pos_embed, blocks.0.attn.qkv.weight)"
        )


def _num_blocks(state_dict: dict[str, torch.Tensor], source: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if not indices:
        raise ValueError(f"{source} has no transformer blocks (expected keys blocks.{{i}}.attn.qkv.weight)")
    if indices != set(range(len(indices))):
        raise ValueError(f"{source} has non-contiguous block indices: {sorted(indices)}")
    return len(indices)


def load_original_state_dict(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read an original DiT checkpoint, preferring the EMA weights when the file holds both.

    With ``mmap`` the tensors stay in the file (the page cache) until read: a rank streaming the weights
    into a partitioned model never holds them all."""
    path = Path(path)
    # weights_only: these files come from the internet; never unpickle arbitrary objects. DiT's
    # train.py also stores its argparse Namespace under "args", a harmless type we allow explicitly.
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if isinstance(obj, dict):
        # train.py checkpoints are {"model", "ema", "opt", "args"}; the released .pt files are bare.
        for wrapper in ("ema", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    _check_is_dit(obj, str(path))
    return obj


def infer_original_dit_config(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int = 16, *, source: str = "state dict"
) -> dict[str, Any]:
    """Derive ``DiTTransformer2DModel`` kwargs from tensor shapes.

    The head count is not recoverable from shapes (qkv is fused), hence the argument: 16 for every
    released DiT-XL/2 checkpoint. ``source`` only labels error messages.
    """
    _check_is_dit(state_dict, source)
    patch_w = state_dict["x_embedder.proj.weight"]  # (hidden, in_channels, p, p)
    hidden, in_channels, patch_size = patch_w.shape[0], patch_w.shape[1], patch_w.shape[-1]
    if hidden % num_attention_heads != 0:
        raise ValueError(
            f"{source}: hidden size {hidden} is not divisible by num_attention_heads={num_attention_heads}"
        )

    num_tokens = state_dict["pos_embed"].shape[-2]
    grid = round(num_tokens**0.5)
    if grid * grid != num_tokens:
        raise ValueError(f"{source}: pos_embed has {num_tokens} tokens, expected a square patch grid")

    out_features = state_dict["final_layer.linear.weight"].shape[0]
    if out_features % (patch_size * patch_size) != 0:
        raise ValueError(
            f"{source}: final_layer.linear has {out_features} outputs, expected a multiple of "
            f"patch_size**2={patch_size * patch_size}"
        )

    freq_dim = state_dict["t_embedder.mlp.0.weight"].shape[1]
    if freq_dim != _TIME_FREQ_DIM:
        raise ValueError(f"{source}: timestep embedder expects {freq_dim} features, diffusers uses 256")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != _MLP_RATIO * hidden:
        raise ValueError(
            f"{source}: MLP width {fc1.shape[0]} is not {_MLP_RATIO}x hidden size {hidden}, "
            "which is the only ratio DiTTransformer2DModel supports"
        )

    return {
        "sample_size": grid * patch_size,  # latent size, not pixel size (32 for 256x256 images)
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": out_features // (patch_size * patch_size),  # 2*in_channels with learned sigma
        "num_layers": _num_blocks(state_dict, source),
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": hidden // num_attention_heads,
        # The last table row is the "null" class used for classifier-free guidance.
        "num_embeds_ada_norm": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",  # original MLP: GELU(approximate="tanh")
        "attention_bias": True,
        "norm_elementwise_affine": False,
        # Original block norms use eps=1e-6; diffusers' default 1e-5 would only affect norm3.
        "norm_eps": 1e-6,
    }


# Where a diffusers tensor comes from: (original key, which third of a fused qkv or None for the whole tensor).
KeyPlan = dict[str, tuple[str, int | None]]


def original_key_plan(state_dict: dict[str, torch.Tensor], *, source: str = "state dict") -> KeyPlan:
    """For every diffusers ``DiTTransformer2DModel`` key, the original tensor it is read from, without reading it:
    so that the weights can be streamed into a model one tensor at a time."""
    _check_is_dit(state_dict, source)
    num_layers = _num_blocks(state_dict, source)
    plan: KeyPlan = {}
    for old, new in _TOP_RENAMES.items():
        for suffix in ("weight", "bias"):
            plan[f"{new}.{suffix}"] = (f"{old}.{suffix}", None)
    embedder: KeyPlan = {}
    for old, new in _EMBEDDER_RENAMES.items():
        for suffix in ("weight",) if old.startswith("y_embedder") else ("weight", "bias"):
            embedder[f"{new}.{suffix}"] = (f"{old}.{suffix}", None)
    for i in range(num_layers):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        plan.update({f"{dst}.{key}": origin for key, origin in embedder.items()})
        for old, new in _BLOCK_RENAMES.items():
            for suffix in ("weight", "bias"):
                plan[f"{dst}.{new}.{suffix}"] = (f"{src}.{old}.{suffix}", None)
        for suffix in ("weight", "bias"):
            qkv = f"{src}.attn.qkv.{suffix}"
            if qkv in state_dict and state_dict[qkv].shape[0] % 3 != 0:
                raise ValueError(f"{source}: {qkv} has {state_dict[qkv].shape[0]} rows, not 3*hidden")
            for third, name in enumerate(("to_q", "to_k", "to_v")):
                plan[f"{dst}.attn1.{name}.{suffix}"] = (qkv, third)
    missing = sorted({old for old, _ in plan.values()} - set(state_dict))
    if missing:
        raise ValueError(f"{source}: missing keys for an original DiT state dict: {', '.join(missing[:10])}")
    leftover = sorted(set(state_dict) - {old for old, _ in plan.values()} - {"pos_embed"})
    if leftover:
        raise ValueError(f"{source}: unexpected keys for an original DiT state dict: {', '.join(leftover[:10])}")
    return plan


def read_planned(state_dict: dict[str, torch.Tensor], origin: tuple[str, int | None]) -> torch.Tensor:
    key, third = origin
    tensor = state_dict[key]
    return tensor if third is None else tensor.chunk(3, dim=0)[third]


def convert_original_dit(state_dict: dict[str, torch.Tensor], *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename/split an original DiT state dict into diffusers ``DiTTransformer2DModel`` keys."""
    plan = original_key_plan(state_dict, source=source)
    # Clones, so that the result has no shared storage (safetensors refuses aliased tensors).
    return {new: read_planned(state_dict, origin).clone() for new, origin in plan.items()}


def use_original_timestep_frequencies(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Make the timestep features match original DiT (frequencies 10000**(-i/128), not -i/127).

    Not stored in the diffusers config: re-apply after ``from_pretrained``.
    """
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def dit_from_original_checkpoint(
    path: str | Path,
    num_attention_heads: int = 16,
    *,
    original_timestep_frequencies: bool = True,
) -> DiTTransformer2DModel:
    """Build a ``DiTTransformer2DModel`` from an original DiT ``.pt`` file and load it strictly.

    With ``original_timestep_frequencies`` (default) the model reproduces the original network's
    outputs exactly; set it to False to keep diffusers' stock (slightly different) timestep features.
    """
    source = str(path)
    state_dict = load_original_state_dict(path)
    config = infer_original_dit_config(state_dict, num_attention_heads, source=source)
    converted = convert_original_dit(state_dict, source=source)

    model = DiTTransformer2DModel(**config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise ValueError(
            f"{source}: converted weights do not fit DiTTransformer2DModel "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(converted, strict=True)

    # The checkpoint's fixed table should equal the one diffusers computes; a mismatch would mean a
    # variant (e.g. learned positions) this converter silently cannot represent.
    original_pos = state_dict["pos_embed"].float().reshape(model.pos_embed.pos_embed.shape)
    if not torch.allclose(original_pos, model.pos_embed.pos_embed, atol=1e-4):
        logger.warning("%s: pos_embed differs from the standard 2D sin-cos table; it is ignored", source)

    if original_timestep_frequencies:
        use_original_timestep_frequencies(model)
    return model.eval()
