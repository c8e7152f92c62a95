"""The knobs for models larger than one GPU: activation checkpointing and per-block torch.compile change the memory
and speed, never the loss or the gradients; TF32; frozen SD parts in the training precision; SD's fixed prompts
encoded once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.annotators import canny
from models.sd_controlnet import SDControlNetFamily
from tests.models.test_sd_controlnet import perturbed
from tests.tiny_sd import shape_image, tiny_sd  # noqa: F401
from trainer.config import load_config
from trainer.setup import load_family


def dit_config(tiny, *overrides: str):
    return load_config("tiny_cpu", [f"model.pretrained={tiny['pretrained']}", "model.num_classes=4", *overrides])


def counted_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    # A pre-hook: the recomputation of a checkpointed block stops early, once it has what the backward needs.
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def dit_loss_and_grads(family, calls_of=None):
    model = family.denoiser.train()
    calls = counted_calls(calls_of(model)) if calls_of else []
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn((4, *family.sample_shape), generator=generator), torch.tensor([3, 250, 600, 999])
    loss = family.predict(model, x, t, torch.tensor([0, 1, 2, 4])).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)


def assert_same(a, b, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=atol, rtol=0, msg=name)


def test_activation_checkpointing_keeps_loss_and_gradients(tiny):
    """The checkpointed blocks run again in the backward (so their activations were not kept), same numbers."""
    first_block = lambda model: model.transformer_blocks[0]  # noqa: E731
    plain = dit_loss_and_grads(load_family(dit_config(tiny), training=True), first_block)
    family = load_family(dit_config(tiny, "train.activation_checkpointing=true"), training=True)
    assert family.denoiser.gradient_checkpointing
    checkpointed = dit_loss_and_grads(family, first_block)
    assert (plain[2], checkpointed[2]) == (1, 2)
    assert_same(checkpointed, plain)


def test_compiled_blocks_keep_loss_and_gradients(tiny):
    """train.compile compiles each block in place (lazily, at the first call); a compiled block computes the same.
    Numbers are checked with the aot_eager backend (graph capture and autograd without code generation); the
    default inductor backend also runs on this CPU but takes about a minute to compile even a tiny DiT."""
    family = load_family(dit_config(tiny, "train.compile=true"), training=True)
    assert all(block._compiled_call_impl is not None for block in family.denoiser.transformer_blocks)
    assert "_orig_mod" not in "".join(family.denoiser.state_dict())  # checkpoints and exports keep their names
    plain = dit_loss_and_grads(load_family(dit_config(tiny)))
    compiled_family = load_family(dit_config(tiny))
    compiled_family.compile_blocks(backend="aot_eager")
    assert_same(dit_loss_and_grads(compiled_family), plain)


@pytest.mark.parametrize("enabled", [False, True])
def test_tf32_follows_the_config(tiny, enabled):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        load_family(dit_config(tiny, f"train.tf32={enabled}"))
        assert torch.backends.cuda.matmul.allow_tf32 is enabled and torch.backends.cudnn.allow_tf32 is enabled
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sd_config(tiny_sd, *overrides: str):  # noqa: F811
    return load_config("tiny_sd_cpu", [f"model.pretrained={tiny_sd['pretrained']}", *overrides])


def controlnet_loss_and_grads(family):
    family.controlnet.load_state_dict(perturbed(family))  # zero convolutions woken, so every parameter gets a gradient
    model = family.denoiser.train()
    calls = counted_calls(model.down_blocks[0].resnets[0])
    controls = torch.from_numpy(np.stack([canny(shape_image(np.random.default_rng(i))) for i in range(2)]))
    fields = {"tokens": family.tokenize(["a red circle", "a square"]), "control": controls}
    condition = family.condition(fields, torch.tensor([False, True]))
    x = torch.randn((2, *family.sample_shape), generator=torch.Generator().manual_seed(0))
    loss = family.predict(model, x, torch.tensor([10, 800]), condition).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)


def test_controlnet_checkpointing_keeps_loss_and_gradients(tiny_sd):  # noqa: F811
    plain = controlnet_loss_and_grads(load_family(sd_config(tiny_sd), training=True))
    checkpointed = controlnet_loss_and_grads(
        load_family(sd_config(tiny_sd, "train.activation_checkpointing=true"), training=True)
    )
    assert (plain[2], checkpointed[2]) == (1, 2)
    assert_same(checkpointed, plain)


def test_frozen_parts_in_bf16_and_fixed_prompts_encoded_once(tiny_sd):  # noqa: F811
    family = SDControlNetFamily.from_pretrained(str(tiny_sd["pretrained"]))
    expected_null = family.encode_text(family.null_tokens[None])
    family.place_frozen(torch.device("cpu"), torch.bfloat16)
    assert {part.dtype for part in (family.unet, family.vae, family.text_encoder)} == {torch.bfloat16}
    encoded: list[int] = []
    family.text_encoder.register_forward_hook(lambda _, args, __: encoded.append(len(args[0])))
    tokens = family.tokenize(["a red circle", "a blue square", "a circle", "the photo"])
    controls = torch.from_numpy(np.stack([canny(shape_image(np.random.default_rng(i))) for i in range(4)]))
    fields = {"tokens": tokens, "control": controls}
    mask = torch.tensor([True, False, True, False])
    first = family.condition(fields, mask)
    again = family.condition(fields, mask)
    family.condition(fields, torch.ones(4, dtype=torch.bool))
    assert encoded == [1, 2, 2]  # the default prompt once; then only the captioned slots; none when all are null
    torch.testing.assert_close(first.text, again.text)
    torch.testing.assert_close(first.text[0].float(), expected_null[0], atol=0.1, rtol=0.05)  # bf16 of the same
    torch.testing.assert_close(first.text[1], family.encode_text(tokens[1:2])[0])
    assert first.text.dtype == torch.bfloat16
    controlnet = family.denoiser_from_state_dict(perturbed(family)).to(torch.bfloat16)
    x = torch.randn((4, *family.sample_shape)).to(torch.bfloat16)
    assert family.predict(controlnet, x, torch.tensor([1, 200, 500, 999]), first).dtype == torch.bfloat16
