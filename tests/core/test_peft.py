"""Parameter-efficient tuning (method.peft): the tunable sets, the merged and adapter exports, the refusals,
and training under DeepSpeed with real processes (frozen weights untouched, exact resume)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DiTTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

from models.dit import DiTFamily
from models.sd_controlnet import SDControlNetFamily
from models.tuning import ADAPTER_WEIGHTS, describe, tuning_method
from models.tuning.difffit import DiffFit
from tests.conftest import assert_ok, copy_as_stopped_after, read_metrics, run_entry, train_args
from tests.core.test_train_distributed import assert_same_run
from tests.tiny_sd import make_tiny_sd
from trainer.config import ConfigError, PeftConfig, load_config
from trainer.ema import read_saved
from trainer.optim import GuardedAdamW
from trainer.setup import apply_tuning

NUM_CLASSES = 4  # the tiny target's classes; the label table has them plus the null row
BLOCK_BIASES = (
    "norm1.emb.timestep_embedder.linear_1.bias", "norm1.emb.timestep_embedder.linear_2.bias", "norm1.linear.bias",
    "attn1.to_q.bias", "attn1.to_k.bias", "attn1.to_v.bias", "attn1.to_out.0.bias", "ff.net.0.proj.bias",
    "ff.net.2.bias",
)  # fmt: skip
# The tiny DiT (tests/tiny.py, 2 blocks of width 16) has no affine norm: DiT's LayerNorms are adaptive.
BIASES = {"pos_embed.proj.bias", "proj_out_1.bias", "proj_out_2.bias"} | {
    f"transformer_blocks.{b}.{name}" for b in (0, 1) for name in BLOCK_BIASES
}
CLASS_TABLES = {f"transformer_blocks.{b}.norm1.emb.class_embedder.embedding_table.weight" for b in (0, 1)}
GAMMAS = {"transformer_blocks.0.attn1.difffit_gamma", "transformer_blocks.0.ff.difffit_gamma"}  # first block only
LORA_TARGETS = {f"transformer_blocks.{b}.attn1.{t}" for b in (0, 1) for t in ("to_q", "to_k", "to_v", "to_out.0")}
# Elements: biases 16+32+24 + 2 x (16+16+96+4x16+64+16) = 616; tables 2 x 5x16 = 160; gammas 2 x 16 = 32.


def tiny_family(tiny) -> DiTFamily:
    return DiTFamily.from_pretrained(str(tiny["pretrained"]), num_classes=NUM_CLASSES)


def settings(**overrides) -> PeftConfig:
    return PeftConfig(**{"difffit_blocks": 1, "lora_rank": 4, **overrides})


def forward(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((3, 3, 8, 8), generator=generator)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([3, 400, 999]), class_labels=torch.tensor([0, 3, 2])).sample


def test_difffit_tunable_set_is_biases_norms_class_embedding_and_gammas(tiny):
    family = tiny_family(tiny)
    method = tuning_method("difffit", settings())
    method.apply(family.denoiser)
    assert set(method.trainable_names(family.denoiser)) == BIASES | CLASS_TABLES | GAMMAS
    assert describe(method, family.denoiser).startswith("tunable set (difffit): 25 of 46 parameter tensors, 808 of")
    frozen = [n for n, p in family.denoiser.named_parameters() if not p.requires_grad]
    assert "transformer_blocks.0.attn1.to_q.weight" in frozen and "transformer_blocks.1.attn1.difffit_gamma" not in {
        n for n, _ in family.denoiser.named_parameters()
    }
    (group,) = method.parameter_groups(family.denoiser, lr=1e-4)
    assert len(group["params"]) == 25 and group["lr"] == group["base_lr"] == pytest.approx(1e-3)  # lr x 10


def test_bitfit_tunable_set_is_the_biases(tiny):
    family = tiny_family(tiny)
    method = tuning_method("bitfit", settings())
    method.apply(family.denoiser)
    assert set(method.trainable_names(family.denoiser)) == BIASES
    assert describe(method, family.denoiser).startswith("tunable set (bitfit): 21 of 44 parameter tensors, 616 of")


def test_difffit_starts_at_the_pretrained_function_and_folds_exactly(tiny):
    family = tiny_family(tiny)
    before = forward(family.denoiser)
    method = DiffFit(num_blocks=2)
    method.apply(family.denoiser)
    assert torch.equal(forward(family.denoiser), before)  # gamma = 1
    with torch.no_grad():
        for param in family.denoiser.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    state = {k: v.detach().clone() for k, v in family.denoiser.state_dict().items()}
    plain = family.denoiser_from_state_dict(method.merged_state_dict(state))
    tuned = forward(family.denoiser)
    assert not torch.allclose(tuned, before, atol=1e-3)
    torch.testing.assert_close(forward(plain), tuned, atol=1e-5, rtol=1e-5)


def test_group_lr_survives_warmup():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = GuardedAdamW([{"params": [weight], "lr": 1e-2, "base_lr": 1e-2}], lr=1e-3, warmup_steps=4)
    optimizer.attach(torch.device("cpu"), max_consecutive_skips=10)
    optimizer.begin_step()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(1e-2 / 4)
    optimizer.counters.restore(applied=10, skipped=0, consecutive=0)
    optimizer.begin_step()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(1e-2)


def test_bad_combinations_are_refused_with_the_reason(tiny):
    with pytest.raises(ConfigError, match=r"method.peft='dora' is not one of \('full', 'bitfit', 'difffit', 'lora'\)"):
        load_config("tiny_cpu", ["method.peft=dora"])
    cfg = load_config("tiny_cpu", ["method.peft=lora", "peft.lora_targets=[to_nothing]"])
    with pytest.raises(ConfigError, match=r"method.peft=lora on model.family=dit: LoRA: no linear layer of "
                       r"DiTTransformer2DModel matches peft.lora_targets=\['to_nothing'\]"):  # fmt: skip
        apply_tuning(cfg, tiny_family(tiny), rank=0)
    cfg = load_config("tiny_cpu", ["method.peft=difffit"])  # the paper's 14 blocks; the tiny DiT has 2
    with pytest.raises(ConfigError, match=r"peft.difffit_blocks=14, but DiTTransformer2DModel has 2 transformer "
                       r"blocks: set peft.difffit_blocks between 1 and 2"):  # fmt: skip
        apply_tuning(cfg, tiny_family(tiny), rank=0)
    convolutions = SimpleNamespace(name="convnet", denoiser=torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, bias=False)))
    for method, reason in (
        ("difffit", "DiffFit scales the attention and MLP branches of transformer blocks, and Sequential has no "
                    "BasicTransformerBlock"),
        ("bitfit", "BitFit tunes bias terms, and Sequential has none"),
        ("lora", r"LoRA: no linear layer of Sequential matches peft.lora_targets=\['to_q', 'to_k', 'to_v', 'to_out"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=f"method.peft={method} on model.family=convnet: {reason}"):
            apply_tuning(load_config("tiny_cpu", [f"method.peft={method}"]), convolutions, rank=0)


def test_every_method_applies_to_the_controlnet_and_exports_a_plain_one(tmp_path):
    """SD + ControlNet: each method finds its modules in the ControlNet, and the merged state loads as a plain
    ControlNetModel (what StableDiffusionControlNetPipeline takes)."""
    pretrained = make_tiny_sd(tmp_path / "sd")
    plain_keys = set(SDControlNetFamily.from_pretrained(str(pretrained)).controlnet.state_dict())
    for name in ("bitfit", "difffit", "lora"):
        family = SDControlNetFamily.from_pretrained(str(pretrained))
        method = tuning_method(name, settings())
        method.apply(family.denoiser)
        names = method.trainable_names(family.denoiser)
        assert 0 < len(names) < len(list(family.denoiser.parameters()))
        state = {k: v.detach().clone() for k, v in family.denoiser.state_dict().items()}
        plain = family.denoiser_from_state_dict(method.merged_state_dict(state))
        assert set(plain.state_dict()) == plain_keys, name
        assert 0 < len(method.adapter_state_dict(state)) <= len(names), name


# --- real training under DeepSpeed ------------------------------------------------------------------------


def base_weights(tiny) -> dict[str, torch.Tensor]:
    """The weights training starts from: the pre-trained DiT mapped onto the target classes."""
    return tiny_family(tiny).denoiser.state_dict()


def exported(run, which: str) -> DiTTransformer2DModel:
    return DiTTransformer2DModel.from_pretrained(run / "export" / which / "transformer").eval()


def module_keys(run, tag: str) -> set[str]:
    rank0 = sorted((run / "checkpoints" / tag).glob("*mp_rank_00_model_states.pt"))[0]  # ZeRO-3 adds zero_pp_rank_0_
    states = torch.load(rank0, weights_only=False)
    return set(states["module"])


@pytest.mark.slow
def test_difffit_zero3_trains_only_its_set(tiny, tmp_path):
    """2 ranks, ZeRO-3, Diff-Tuning: frozen weights are bit-identical, checkpoints hold the tunable set only."""
    run = tmp_path / "difffit"
    args = ("method.peft=difffit", "peft.difffit_blocks=1", "train.zero_stage=3", "train.steps=3")
    proc = run_entry("train.py", train_args(tiny, run, *args), num_procs=2)
    assert_ok(proc)
    assert "tunable set (difffit): 25 of 46 parameter tensors, 808 of 19,816 elements" in proc.stdout
    tunable = BIASES | CLASS_TABLES | GAMMAS
    assert module_keys(run, "step_00000003") == tunable
    assert set(read_saved(run / "checkpoints" / "step_00000003")) == tunable  # the EMA of the tunable set only
    base, merged = base_weights(tiny), exported(run, "raw").state_dict()
    adapter = load_file(run / "export" / "raw_adapter" / ADAPTER_WEIGHTS)
    assert set(adapter) == tunable
    folded = {"transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.ff.net.2"}
    for key, weight in base.items():
        if key in tunable or key.rsplit(".", 1)[0] in folded:
            continue
        assert torch.equal(merged[key], weight), key  # frozen: bit-identical
    for linear, gamma in zip(sorted(folded), sorted(GAMMAS)):  # attn1 <-> to_out.0, ff <-> net.2
        assert not torch.equal(adapter[gamma], torch.ones_like(adapter[gamma]))
        torch.testing.assert_close(merged[f"{linear}.weight"], base[f"{linear}.weight"] * adapter[gamma][:, None])
    assert all(not torch.equal(adapter[k], base[k]) for k in BIASES)  # every bias trained
    # The adapter on the frozen base computes what the merged export computes.
    family = tiny_family(tiny)
    DiffFit(num_blocks=1).apply(family.denoiser)
    assert not family.denoiser.load_state_dict(adapter, strict=False).unexpected_keys
    torch.testing.assert_close(forward(exported(run, "raw")), forward(family.denoiser.eval()), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_lora_zero2_resumes_exactly_and_merges_like_the_adapter(tiny, tmp_path):
    """4 steps straight (2 ranks, ZeRO-2, Diff-Tuning) == the same run stopped at its step-2 checkpoint and
    resumed; the merged export equals the adapter applied to the frozen base at inference."""
    common = ("method.peft=lora", "peft.lora_rank=4", "train.zero_stage=2", "train.steps=4", "run.ckpt_every=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_entry("train.py", train_args(tiny, straight, *common), num_procs=2)
    assert_ok(proc)
    assert "tunable set (lora): 16 of 60 parameter tensors, 1,024 of 20,808 elements" in proc.stdout
    adapters = {f"{module}.lora_{ab}.default.weight" for module in LORA_TARGETS for ab in "AB"}
    assert module_keys(straight, "step_00000002") == adapters  # the checkpoint holds only what trains
    # The run as it was when it stopped after step 2: its checkpoint, its log, nothing later.
    copy_as_stopped_after(straight, resumed, 2)
    assert_ok(run_entry("train.py", train_args(tiny, resumed, *common) + ["--resume"], num_procs=2))
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4]
    assert_same_run(straight, resumed, steps={3, 4}, rtol=1e-6)

    base = base_weights(tiny)
    merged = exported(straight, "raw")
    frozen = {k for k in base if k.rsplit(".", 1)[0] not in LORA_TARGETS} - CLASS_TABLES  # tables: padded on export
    assert all(torch.equal(merged.state_dict()[k], base[k]) for k in frozen)  # frozen: untouched
    family = tiny_family(tiny)
    model = inject_adapter_in_model(LoraConfig.from_pretrained(straight / "export" / "raw_adapter"), family.denoiser)
    set_peft_model_state_dict(model, load_file(straight / "export" / "raw_adapter" / ADAPTER_WEIGHTS))
    adapted, plain = forward(model.eval()), forward(family.denoiser_from_state_dict(base))
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(forward(merged), adapted, atol=1e-5, rtol=0)
