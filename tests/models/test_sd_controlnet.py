"""The SD 1.5 + ControlNet family: loading, conditions, export into diffusers' pipeline, and Diff-Tuning under
DeepSpeed on 2 CPU ranks (global-batch invariance, frozen parts untouched, checkpoints of the ControlNet only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from PIL import Image

from launch.train import main
from models.annotators import canny
from models.sd_controlnet import DEFAULT_PROMPT, SDControlNetFamily
from tests.conftest import ROOT, assert_ok, copy_as_stopped_after, read_metrics, run_entry, run_script
from tests.tiny_sd import fingerprint, make_tiny_sd, no_leaked_shm, sd_train_args, shape_image, tiny_sd  # noqa: F401
from trainer.ema import read_saved

pytestmark = [pytest.mark.usefixtures("no_leaked_shm")]

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def family(tiny_sd) -> SDControlNetFamily:  # noqa: F811
    return SDControlNetFamily.from_pretrained(str(tiny_sd["pretrained"]))


def perturbed(family: SDControlNetFamily, seed: int = 0) -> dict[str, torch.Tensor]:
    """ControlNet weights with its zero convolutions woken up, so that the control changes the output."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in family.controlnet.state_dict().items()}


def test_only_the_controlnet_tunes(family):
    assert family.denoiser is family.controlnet
    tuned = {id(p) for p in family.tunable_parameters(family.denoiser)}
    assert tuned == {id(p) for p in family.controlnet.parameters()}
    for part in (family.unet, family.vae, family.text_encoder):
        assert not part.training and not any(p.requires_grad for p in part.parameters())
    assert family.sample_shape == (4, 8, 8) and family.image_size == 64
    assert family.betas()[0] == pytest.approx(0.00085) and family.betas()[-1] == pytest.approx(0.012)  # scaled linear


def test_null_slots_get_the_default_prompt_and_keep_their_control(family):
    tokens = family.tokenize(["a red circle", "a blue square"]).int()
    controls = torch.from_numpy(np.stack([canny(shape_image(np.random.default_rng(i))) for i in range(2)]))
    condition = family.condition({"tokens": tokens, "control": controls}, torch.tensor([True, False]))
    want = family.encode_text(torch.stack([family.tokenize([DEFAULT_PROMPT])[0], tokens[1].long()]))
    torch.testing.assert_close(condition.text, want)
    assert condition.control.shape == (2, 3, 64, 64) and condition.control.max() == 1.0
    torch.testing.assert_close(condition.control, controls.permute(0, 3, 1, 2).float() / 255)


def test_a_fresh_controlnet_leaves_sd_unchanged(family):
    """ControlNet.from_unet starts with zero convolutions: the prediction is the frozen UNet's own."""
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    controls = torch.from_numpy(np.stack([canny(shape_image(np.random.default_rng(i))) for i in range(2)]))
    condition = family.condition({"tokens": family.tokenize(["a", "b"]), "control": controls}, torch.tensor([0, 0]) > 0)
    with torch.no_grad():
        torch.testing.assert_close(
            family.predict(family.controlnet, x, t, condition), family.predict(None, x, t, condition)
        )
        woken = family.denoiser_from_state_dict(perturbed(family))
        assert not torch.allclose(family.predict(woken, x, t, condition), family.predict(None, x, t, condition))


def test_export_runs_in_the_controlnet_pipeline(family, tiny_sd, tmp_path):  # noqa: F811
    """The exported folder is a ControlNetModel, and StableDiffusionControlNetPipeline with the tiny SD parts and
    DDIM computes what the family's own sampler does (classifier-free guidance against the empty prompt)."""
    state = perturbed(family)
    family.export(state, tmp_path / "controlnet")
    controlnet = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd["pretrained"], controlnet=controlnet)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    control = canny(shape_image(np.random.default_rng(3)))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    got = pipe("a red circle", image=Image.fromarray(control), num_inference_steps=3, guidance_scale=3.0,
               latents=noise.clone(), output_type="np", height=64, width=64).images  # fmt: skip
    ours = family.sample(
        family.denoiser_from_state_dict(state), family.tokenize(["a red circle"]), torch.from_numpy(control[None]),
        num_steps=3, guidance_scale=3.0, noise=noise,
    )  # fmt: skip
    np.testing.assert_allclose(got, (ours.permute(0, 2, 3, 1).numpy() + 1) / 2, atol=2e-4)


def test_v_prediction_is_refused(tmp_path):
    make_tiny_sd(tmp_path / "sd_v", prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"predicts 'v_prediction'.*epsilon-prediction models only"):
        SDControlNetFamily.from_pretrained(str(tmp_path / "sd_v"))


def test_missing_folders_are_named(tiny_sd, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(sd_train_args(tiny_sd, run, f"model.pretrained={tmp_path / 'nowhere'}")) == 2
    assert f"model.pretrained={tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    (tmp_path / "half" / "unet").mkdir(parents=True)
    assert main(sd_train_args(tiny_sd, run, f"model.pretrained={tmp_path / 'half'}")) == 2
    assert "has no vae/, text_encoder/, tokenizer/, scheduler/" in capsys.readouterr().err
    assert main(sd_train_args(tiny_sd, run, f"model.sd_controlnet.controlnet={tmp_path / 'no_controlnet'}")) == 2
    assert (
        f"model.sd_controlnet.controlnet={tmp_path / 'no_controlnet'} is not a ControlNetModel folder"
        in capsys.readouterr().err
    )
    assert not run.exists()


# --- Diff-Tuning under DeepSpeed, real processes ----------------------------------------------------------------------
def exported(run_dir, which: str) -> dict[str, torch.Tensor]:
    return ControlNetModel.from_pretrained(run_dir / "export" / which).state_dict()


def assert_close_weights(a: dict, b: dict, which: str, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=1e-7, msg=f"{which}: {key}")


def losses(run_dir) -> list[float]:
    return [m["loss/total"] for m in read_metrics(run_dir) if "loss/total" in m]


SD_INVARIANCE_RUN = ("train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=4", "eval.every=2")


@pytest.fixture(scope="module")
def sd_one_rank(tiny_sd, tmp_path_factory):  # noqa: F811
    """The reference of both ZeRO stages: 1 rank x micro 2 x accumulation 2 (ZeRO-2; one rank reduces nothing)."""
    run = tmp_path_factory.mktemp("sd_invariance") / "one_rank"
    assert_ok(run_entry("train.py", sd_train_args(tiny_sd, run, *SD_INVARIANCE_RUN, "train.zero_stage=2"), num_procs=1))
    return run


@slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_global_batch_invariance(tiny_sd, tmp_path, sd_one_rank, zero_stage):  # noqa: F811
    """2 ranks x micro 2 x accumulation 1 == 1 rank x micro 2 x accumulation 2 (fp32): the same per-step losses,
    exported ControlNet weights and convergence curve."""
    two, one = tmp_path / "two_ranks", sd_one_rank
    overrides = (*SD_INVARIANCE_RUN, f"train.zero_stage={zero_stage}")
    assert_ok(run_entry("train.py", sd_train_args(tiny_sd, two, *overrides), num_procs=2))
    assert len(losses(one)) == 4 and len(set(losses(one))) == 4
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    for which in ("raw", "ema"):
        assert_close_weights(exported(two, which), exported(one, which), which)
    start = ControlNetModel.from_unet(SDControlNetFamily.from_pretrained(str(tiny_sd["pretrained"])).unet).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in exported(one, "raw").items())
    curves = [
        [(m["step"], m["convergence/ssim"]) for m in read_metrics(r) if "convergence/ssim" in m] for r in (two, one)
    ]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] == [2, 4]
    np.testing.assert_allclose([v for _, v in curves[0]], [v for _, v in curves[1]], atol=1e-3)


def probe(tiny, out, run_dir, *overrides, resume=False):
    """launch/train.py on 2 ranks through tests/tiny_sd.py's probe, which records the frozen parts on every rank."""
    args = [str(out), *sd_train_args(tiny, run_dir, *overrides), *(["--resume"] if resume else [])]
    assert_ok(run_script(ROOT / "tests" / "tiny_sd.py", args, num_procs=2))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@slow
def test_frozen_parts_stay_bit_identical_and_out_of_checkpoints(tiny_sd, tmp_path):  # noqa: F811
    """ZeRO-3 on 2 ranks: the UNet, VAE and text encoder are never partitioned, trained or changed, also across a
    save and --resume; the checkpoint and the EMA hold the ControlNet only; the resumed run is the straight run."""
    common = ("train.steps=4", "train.zero_stage=3", "run.ckpt_every=2", "run.keep_last=0")
    family = SDControlNetFamily.from_pretrained(str(tiny_sd["pretrained"]))
    on_disk = {"unet": fingerprint(family.unet), "vae": fingerprint(family.vae),
               "text_encoder": fingerprint(family.text_encoder)}  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    reports = probe(tiny_sd, tmp_path / "probe_straight", straight, *common)
    copy_as_stopped_after(straight, resumed, 2)
    reports += probe(tiny_sd, tmp_path / "probe_resumed", resumed, *common, resume=True)
    for report in reports:
        assert report["status"] == 0
        for when in ("at_load", "after"):
            for name, part in report[when].items():
                assert part == {"sha256": on_disk[name], "trainable": False, "partitioned": False,
                                "training_mode": False}, (when, name)  # fmt: skip
    np.testing.assert_allclose(losses(resumed), losses(straight), rtol=1e-6)
    assert_close_weights(exported(resumed, "raw"), exported(straight, "raw"), "raw", rtol=1e-6)

    controlnet_keys = set(family.controlnet.state_dict())
    num_tuned = sum(p.numel() for p in family.controlnet.parameters())
    for tag in ("step_00000002", "step_00000004"):
        folder = resumed / "checkpoints" / tag
        assert set(read_saved(folder)) == set(dict(family.controlnet.named_parameters()))  # the EMA: ControlNet only
        for rank in range(2):
            states = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)
            assert set(states["module"]) <= controlnet_keys and not states["frozen_param_shapes"]
            shapes = states["param_shapes"][0]
            assert set(shapes) == set(dict(family.controlnet.named_parameters()))
            assert sum(int(np.prod(shape)) for shape in shapes.values()) == num_tuned
