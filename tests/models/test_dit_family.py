"""The DiT family: label-space mapping, the trainer owning label dropout, the original checkpoint path."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from models.dit import DiTFamily
from models.dit_convert import convert_original_dit
from tests.tiny import TINY_DIT, make_tiny_dit

TABLE = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_tiny_dit(tmp_path_factory.mktemp("dit") / "model")


def table(model) -> torch.Tensor:
    return model.state_dict()[TABLE]


def test_reuse_keeps_first_k_rows_and_the_null_row(pretrained):
    original = DiTTransformer2DModel.from_pretrained(pretrained / "transformer")
    family = DiTFamily.from_pretrained(str(pretrained), num_classes=4, class_init="reuse")
    new, old = table(family.denoiser), table(original)
    assert new.shape[0] == 5 and family.null_condition == 4
    torch.testing.assert_close(new[:4], old[:4])
    torch.testing.assert_close(new[4], old[10])  # the pre-trained null row stays the null row
    # every block's copy of the table is mapped the same way, and nothing else changed
    for key, value in family.denoiser.state_dict().items():
        if "class_embedder" not in key:
            torch.testing.assert_close(value, original.state_dict()[key])


def test_fresh_rows_are_new_and_identical_across_blocks(pretrained):
    original = DiTTransformer2DModel.from_pretrained(pretrained / "transformer")
    family = DiTFamily.from_pretrained(str(pretrained), num_classes=12, class_init="fresh", seed=3)
    new = table(family.denoiser)
    assert new.shape[0] == 13
    torch.testing.assert_close(new[12], table(original)[10])
    assert not torch.allclose(new[:10], table(original)[:10])
    block1 = TABLE.replace("blocks.0", "blocks.1")
    torch.testing.assert_close(new[:12], family.denoiser.state_dict()[block1][:12])
    torch.testing.assert_close(family.denoiser.state_dict()[block1][12], original.state_dict()[block1][10])


def test_the_trainer_owns_label_dropout(pretrained):
    """diffusers would drop labels at random in train mode; ours are a deterministic function of the input."""
    family = DiTFamily.from_pretrained(str(pretrained))
    model = family.denoiser.train()
    x, t, labels = torch.randn(64, 3, 8, 8), torch.full((64,), 500), torch.arange(64) % 10
    with torch.no_grad():
        a, b = model(x, timestep=t, class_labels=labels).sample, model(x, timestep=t, class_labels=labels).sample
        null = model(x, timestep=t, class_labels=torch.full((64,), 10)).sample
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, null)
    dropped = family.condition({"label": labels}, torch.arange(64) % 2 == 0)
    assert (dropped[::2] == 10).all() and torch.equal(dropped[1::2], labels[1::2])


def test_original_checkpoint_loads_through_the_family(tmp_path):
    """A `.pt` in the original key layout (made by inverting the conversion's key map) loads with K classes."""
    model = DiTTransformer2DModel(**TINY_DIT, norm_eps=1e-6).eval()  # the original DiT's LayerNorm eps
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        # the original has one timestep/label embedder, which diffusers copies into every block
        model.transformer_blocks[1].norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    state = model.state_dict()
    original = {
        "x_embedder.proj.weight": state["pos_embed.proj.weight"], "x_embedder.proj.bias": state["pos_embed.proj.bias"],
        "pos_embed": model.pos_embed.pos_embed.clone(),
        "t_embedder.mlp.0.weight": state["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": state["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": state["transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": state["transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": state[TABLE],
        "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"],
        "final_layer.linear.weight": state["proj_out_2.weight"], "final_layer.linear.bias": state["proj_out_2.bias"],
    }  # fmt: skip
    for i in range(2):
        b = f"transformer_blocks.{i}."
        for ours, theirs in (("norm1.linear", "adaLN_modulation.1"), ("attn1.to_out.0", "attn.proj"),
                             ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")):  # fmt: skip
            for kind in ("weight", "bias"):
                original[f"blocks.{i}.{theirs}.{kind}"] = state[f"{b}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            original[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([state[f"{b}attn1.to_{p}.{kind}"] for p in "qkv"])
    assert convert_original_dit(original).keys() == state.keys()
    path = tmp_path / "DiT-tiny.pt"
    torch.save({"ema": original}, path)
    family = DiTFamily.from_pretrained(str(path), num_classes=4, num_attention_heads=2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        want = model(x, timestep=t, class_labels=torch.tensor([1, 10])).sample
        got = family.denoiser(x, timestep=t, class_labels=torch.tensor([1, 4])).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert family.betas()[0] == pytest.approx(1e-4) and family.betas()[-1] == pytest.approx(0.02)
