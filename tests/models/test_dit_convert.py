"""Converter tests against an independent re-implementation of the original DiT architecture."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models.dit_convert import (
    convert_original_dit,
    dit_from_original_checkpoint,
    infer_original_dit_config,
    load_original_state_dict,
)

# ---------------------------------------------------------------------------------------------
# Reference: the original DiT network, module names as in facebookresearch/DiT (written anew).
# ---------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = pos.reshape(-1, 1).double() * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    # Token order is row-major (h, w); the first half of channels encodes the column (w) index.
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))  # cos first


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # last row: null class

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_a[:, None] * self.attn(_modulate(self.norm1(x), sh_a, sc_a))
        return x + g_m[:, None] * self.mlp(_modulate(self.norm2(x), sh_m, sc_m))


class _FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_ch: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class OriginalDiT(nn.Module):
    def __init__(
        self, input_size: int, patch: int, in_ch: int, hidden: int, depth: int, heads: int, num_classes: int
    ) -> None:
        super().__init__()
        self.patch, self.out_ch = patch, 2 * in_ch  # learned sigma
        self.x_embedder = _PatchEmbed(patch, in_ch, hidden)
        self.t_embedder = _TimestepEmbedder(hidden)
        self.y_embedder = _LabelEmbedder(num_classes, hidden)
        self.register_buffer("pos_embed", _sincos_2d(hidden, input_size // patch)[None])
        self.blocks = nn.ModuleList(_DiTBlock(hidden, heads) for _ in range(depth))
        self.final_layer = _FinalLayer(hidden, patch, self.out_ch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grid = x.shape[-1] // self.patch
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)  # (N, T, p*p*C)
        h = h.reshape(-1, grid, grid, self.patch, self.patch, self.out_ch)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, self.out_ch, grid * self.patch, grid * self.patch)


# ---------------------------------------------------------------------------------------------

TINY = {"input_size": 8, "patch": 2, "in_ch": 4, "hidden": 32, "depth": 2, "heads": 2, "num_classes": 10}


@pytest.fixture()
def reference() -> OriginalDiT:
    torch.manual_seed(0)
    model = OriginalDiT(**TINY).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # DiT zero-initialises adaLN and the final linear; random values keep every path live.
            # The scale keeps outputs O(1) so atol=1e-5 is a tight check (it catches e.g. norm eps 1e-5).
            param.copy_(torch.randn_like(param) * (0.15 if param.ndim > 1 else 0.05))
            assert param.abs().sum() > 0, name
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # 10 == null class
    return x, t, y


def _save(obj: object, tmp_path: Path) -> Path:
    path = tmp_path / "DiT-tiny.pt"
    torch.save(obj, path)
    return path


def test_converted_model_matches_original(reference: OriginalDiT, tmp_path: Path) -> None:
    model = dit_from_original_checkpoint(_save(reference.state_dict(), tmp_path), num_attention_heads=2)
    x, t, y = _inputs()
    with torch.no_grad():
        expected = reference(x, t, y)
        got = model(x, timestep=t, class_labels=y).sample
    assert got.shape == expected.shape == (4, 8, 8, 8)
    assert expected.abs().mean() > 0.1  # not trivially zero
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_pos_embed_matches_diffusers(reference: OriginalDiT, tmp_path: Path) -> None:
    model = dit_from_original_checkpoint(_save(reference.state_dict(), tmp_path), num_attention_heads=2)
    torch.testing.assert_close(model.pos_embed.pos_embed, reference.pos_embed, atol=1e-6, rtol=0)


def test_stock_diffusers_timestep_features_differ(reference: OriginalDiT, tmp_path: Path) -> None:
    # diffusers' DiT spaces frequencies by 1/127 instead of 1/128: the flag is what makes outputs exact.
    path = _save(reference.state_dict(), tmp_path)
    model = dit_from_original_checkpoint(path, num_attention_heads=2, original_timestep_frequencies=False)
    x, t, y = _inputs()
    with torch.no_grad():
        diff = (model(x, timestep=t, class_labels=y).sample - reference(x, t, y)).abs().max()
    assert diff > 1e-3


def test_ema_wrapper_is_preferred(reference: OriginalDiT, tmp_path: Path) -> None:
    ema = reference.state_dict()
    other = {k: torch.zeros_like(v) for k, v in ema.items()}
    # Same layout as DiT's train.py checkpoints, including the argparse Namespace.
    args = argparse.Namespace(model="DiT-tiny", image_size=16)
    path = _save({"model": other, "ema": ema, "opt": {}, "args": args}, tmp_path)
    loaded = load_original_state_dict(path)
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)

    model = dit_from_original_checkpoint(path, num_attention_heads=2)
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample, reference(x, t, y), atol=1e-5, rtol=0)


def test_model_wrapper_without_ema(reference: OriginalDiT, tmp_path: Path) -> None:
    sd = reference.state_dict()
    loaded = load_original_state_dict(_save({"model": sd}, tmp_path))
    assert loaded.keys() == sd.keys()


def test_inferred_config(reference: OriginalDiT) -> None:
    config = infer_original_dit_config(reference.state_dict(), num_attention_heads=2)
    assert config == {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_embeds_ada_norm": 10,
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }


def test_inferred_config_dit_xl_2_256_shapes() -> None:
    # Shapes only (meta tensors): the released DiT-XL/2 256x256 checkpoint.
    hidden, meta = 1152, torch.device("meta")
    sd = {
        "x_embedder.proj.weight": torch.empty(hidden, 4, 2, 2, device=meta),
        "pos_embed": torch.empty(1, 256, hidden, device=meta),
        "t_embedder.mlp.0.weight": torch.empty(hidden, 256, device=meta),
        "y_embedder.embedding_table.weight": torch.empty(1001, hidden, device=meta),
        "final_layer.linear.weight": torch.empty(2 * 2 * 8, hidden, device=meta),
        "blocks.0.mlp.fc1.weight": torch.empty(4 * hidden, hidden, device=meta),
        **{f"blocks.{i}.attn.qkv.weight": torch.empty(3 * hidden, hidden, device=meta) for i in range(28)},
    }
    config = infer_original_dit_config(sd)
    assert (config["sample_size"], config["num_layers"], config["attention_head_dim"]) == (32, 28, 72)
    assert (config["out_channels"], config["num_embeds_ada_norm"]) == (8, 1000)


def test_convert_keys_and_qkv_split(reference: OriginalDiT) -> None:
    sd = reference.state_dict()
    converted = convert_original_dit(sd)
    qkv = sd["blocks.1.attn.qkv.weight"]
    torch.testing.assert_close(converted["transformer_blocks.1.attn1.to_k.weight"], qkv[32:64])
    for i in range(2):  # the single original embedder lands in every block
        torch.testing.assert_close(
            converted[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"],
            sd["y_embedder.embedding_table.weight"],
        )
    assert not any(k.startswith("blocks.") or k == "pos_embed" for k in converted)


def test_not_a_dit_checkpoint(tmp_path: Path) -> None:
    path = _save({"conv_in.weight": torch.zeros(1)}, tmp_path)
    with pytest.raises(ValueError, match=r"DiT-tiny\.pt.*missing x_embedder\.proj\.weight"):
        dit_from_original_checkpoint(path)
    with pytest.raises(ValueError, match=r"DiT-tiny\.pt.*expected a state dict"):
        load_original_state_dict(_save(torch.zeros(3), tmp_path))


def test_heads_must_divide_hidden(reference: OriginalDiT, tmp_path: Path) -> None:
    path = _save(reference.state_dict(), tmp_path)
    with pytest.raises(ValueError, match=r"DiT-tiny\.pt.*hidden size 32 is not divisible by num_attention_heads=3"):
        dit_from_original_checkpoint(path, num_attention_heads=3)


def test_unexpected_keys_rejected(reference: OriginalDiT) -> None:
    sd = dict(reference.state_dict())
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(ValueError, match="unexpected keys.*q_norm"):
        convert_original_dit(sd)
