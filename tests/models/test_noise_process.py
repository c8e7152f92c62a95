"""The model-family and noise-process seams: every family satisfies the Protocol, the EDM process's psi / xi
histograms match their definition, its loss matches a hand computation and diffusers' preconditioning, bad
combinations are refused with the reason, and a continuous-sigma family trains under DeepSpeed, resumes exactly
and exports a folder that loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, EDMEulerScheduler
from scipy.special import ndtr, ndtri
from scipy.stats import chisquare, norm

from data.batch import MicroBatch
from data.sampler import BANK, TARGET, GlobalBatchPlanner, NoiseLevels
from models import FAMILIES, family_class
from models.dit_edm import DiTEDMFamily
from models.family import ModelFamily, missing_members
from models.noise import NOISE_PROCESSES, NoiseProcess
from models.noise.edm import P_MEAN, P_STD, EDMProcess
from tests.conftest import assert_ok, copy_as_stopped_after, read_metrics, run_entry, train_args
from tests.core.test_host_reads import quiet_steps
from tests.core.test_train_distributed import assert_same_run
from trainer.config import ConfigError, MethodConfig, load_config
from trainer.loop import slot_losses

NUM_BINS = 20


def test_every_registered_family_has_every_member_and_its_process(tiny):
    for name in FAMILIES:
        assert missing_members(family_class(name)) == [], name
    for name in ("dit", "dit_edm", "dit_flow"):  # instances: the runtime-checkable Protocols
        family = family_class(name).from_pretrained(str(tiny["pretrained"]), num_classes=4)
        assert isinstance(family, ModelFamily) and isinstance(family.noise_process, NoiseProcess)
        assert family.noise_process.name == FAMILIES[name].noise_process
    assert set(NOISE_PROCESSES) == {"ddpm", "edm", "flow"}
    assert {"noise_process", "predict", "export"} <= set(missing_members(object()))  # the check can fail


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown model family 'convnet'; known: dit, dit_edm, dit_flow, sd_controlnet"
    ):
        family_class("convnet")
    with pytest.raises(
        ConfigError, match=r"model.family='convnet' is not one of \('dit', 'dit_edm', 'dit_flow', 'sd_c"
    ):
        load_config(overrides=["model.family=convnet"])


def expected_bin_masses(weight, edges_log_sigma: np.ndarray) -> np.ndarray:
    """Masses of the bins under density p(sigma) * weight(sigma), by quadrature in ln(sigma) straight from the
    definition (independent of the inverse-CDF sampling that the process uses)."""
    s = np.linspace(P_MEAN - 9 * P_STD, P_MEAN + 9 * P_STD, 400_001)
    density = norm.pdf(s, P_MEAN, P_STD) * weight(np.exp(s))
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(s))])
    at_edges = np.interp(edges_log_sigma, s, cumulative)
    return np.diff(at_edges) / cumulative[-1]


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_continuous_psi_and_xi_histograms_match_their_definition(tau):
    split = EDMProcess().split(MethodConfig(tau=tau))
    assert isinstance(split, NoiseLevels)
    grid = np.exp(np.linspace(-8, 4, 97))
    np.testing.assert_allclose(split.psi(grid) + split.xi(grid), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(split.psi(grid), ndtr((np.log(grid) - P_MEAN) / P_STD) ** tau)
    planner = GlobalBatchPlanner(
        global_batch_size=512, num_target=64, num_bank=64, bank_ratio=0.5, split=split, label_dropout=0.1, seed=3
    )
    plans = [planner.plan(step) for step in range(50)]
    sigma = {s: np.concatenate([p.t[p.source == s] for p in plans]) for s in (TARGET, BANK)}
    assert sigma[TARGET].dtype == np.float64 and len(sigma[TARGET]) == len(sigma[BANK]) == 12_800
    # Bins of equal probability under the training distribution, in ln(sigma); the tails run to +-9 std.
    inner = P_MEAN + P_STD * ndtri(np.arange(1, NUM_BINS) / NUM_BINS)
    edges = np.concatenate([[P_MEAN - 9 * P_STD], inner, [P_MEAN + 9 * P_STD]])
    masses = {
        TARGET: expected_bin_masses(split.psi, edges),
        BANK: expected_bin_masses(split.xi, edges),
        "training": expected_bin_masses(np.ones_like, edges),
    }
    for source, other in ((TARGET, BANK), (BANK, TARGET)):
        observed = np.histogram(np.log(sigma[source]), edges)[0]
        assert observed.sum() == len(sigma[source])
        assert chisquare(observed, masses[source] * observed.sum()).pvalue > 1e-3
        # The same test rejects the other source's distribution and the untilted one: it has the power to fail.
        assert chisquare(observed, masses[other] * observed.sum()).pvalue < 1e-6
        assert chisquare(observed, masses["training"] * observed.sum()).pvalue < 1e-6


def test_continuous_plan_is_global_batch_invariant():
    split = EDMProcess().split(MethodConfig())
    planner = GlobalBatchPlanner(
        global_batch_size=16, num_target=40, num_bank=24, bank_ratio=0.25, split=split, label_dropout=0.1, seed=7
    )
    whole = planner.plan(5)
    for slots in (np.array([3, 0, 15]), np.arange(1, 16, 2)):
        part = planner.plan(5, slots)
        np.testing.assert_array_equal(part.t, whole.t[slots])
    assert np.all(whole.t > 0) and np.all(np.isfinite(whole.t))


def test_edm_loss_matches_the_hand_computation_and_diffusers_preconditioning(tiny):
    family = DiTEDMFamily.from_pretrained(str(tiny["pretrained"]), num_classes=4)
    process, generator = family.noise_process, torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    x0, noise = torch.rand((4, 3, 8, 8), generator=generator) * 2 - 1, torch.randn((4, 3, 8, 8), generator=generator)
    labels = torch.tensor([0, 3, 2, 1])
    null = torch.tensor([False, False, True, False])
    batch = MicroBatch(x0, noise, sigma, {"label": labels}, null, torch.zeros(4, dtype=torch.bool), np.zeros((4, 3)))
    got = slot_losses(family, family.denoiser, batch, process, torch.float32, MethodConfig())

    s, sd = sigma.numpy()[:, None, None, None], 0.5  # EDM's Table 1, in float64
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2), 1 / np.sqrt(s**2 + sd**2)
    x_t = x0.double().numpy() + s * noise.double().numpy()
    class_labels = torch.where(null, 4, labels)
    with torch.no_grad():
        net = family.denoiser(
            torch.from_numpy(c_in * x_t).float(), timestep=torch.log(sigma).float() / 4, class_labels=class_labels
        ).sample[:, :3]
    denoised = c_skip * x_t + c_out * net.double().numpy()
    weight = (s.ravel() ** 2 + sd**2) / (s.ravel() * sd) ** 2
    expected = weight * ((denoised - x0.double().numpy()) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4)

    # diffusers' EDM scheduler applies the same preconditioning when it samples the exported model.
    scheduler = EDMEulerScheduler(sigma_data=sd)
    for i in range(4):
        x, level = torch.from_numpy(x_t[i : i + 1]).float(), sigma[i : i + 1]
        model_input, c_noise = process.model_input(x, level)
        torch.testing.assert_close(model_input, scheduler.precondition_inputs(x, float(level)))
        torch.testing.assert_close(c_noise, scheduler.precondition_noise(level).float())
        out = net[i : i + 1]
        torch.testing.assert_close(
            process.denoised(out, x, level), scheduler.precondition_outputs(x, out, float(level)), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["noise.p_mean=-1.0"], "model.family=dit: noise.p_mean=-1.0 sets the continuous sigma distribution of an EDM "
         "process, but this family trains the discrete DDPM process"),
        (["model.family=sd_controlnet", "noise.sigma_data=1.0"], "model.family=sd_controlnet: noise.sigma_data=1.0"),
        (["model.family=dit_edm", "method.timestep_weights=mirrored"], "defined on integer timesteps; on continuous "
         "sigma Diff-Tuning uses psi = CDF"),
        (["model.family=dit_edm", "method.loss_weighting=min_snr"], "EDM's loss weight lambda"),
        (["model.family=dit_edm", "method.tau=-1"], r"method.tau=-1.0: psi\(sigma\) = CDF\(sigma\)\^tau needs"),
        (["model.family=dit_edm", "noise.p_std=0"], "noise.p_std=0.0 must be > 0"),
    ],
)  # fmt: skip
def test_bad_combinations_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_edm_family_has_no_betas_and_takes_noise_settings(tiny):
    family = DiTEDMFamily.from_pretrained(
        str(tiny["pretrained"]), noise=load_config(overrides=["model.family=dit_edm", "noise.p_mean=-0.5"]).noise
    )
    assert (family.noise_process.p_mean, family.noise_process.p_std, family.noise_process.sigma_data) == (
        -0.5,
        1.2,
        0.5,
    )
    with pytest.raises(ValueError, match="model.family=dit_edm trains in continuous sigma"):
        family.betas()


def test_edm_family_generates_its_own_bank(tiny):
    """The bank job's recipe works for a family without DDPM settings: samples come from its EDM sampler."""
    from trainer.jobs.bank import bank_recipe

    cfg = load_config("tiny_cpu", [f"model.pretrained={tiny['pretrained']}", "model.family=dit_edm",
                                   "bank.num_steps=3", "bank.batch_size=2"])  # fmt: skip
    family = DiTEDMFamily.from_pretrained(str(tiny["pretrained"]), num_classes=0)
    _, settings, samples = bank_recipe(cfg, family, torch.device("cpu"))
    assert settings["clip_sample"] is None
    drawn = list(samples(range(2), lambda n: None))
    assert [d["meta"]["index"] for d in drawn] == [0, 1]
    assert all(np.isfinite(d["x"]).all() and d["x"].shape == tuple(family.sample_shape) for d in drawn)


@pytest.mark.slow
def test_edm_family_trains_zero2_resumes_exactly_and_exports_what_loads(tiny, tmp_path):
    """4 steps straight (2 ranks, ZeRO-2, Diff-Tuning, continuous sigma) == the run stopped at its step-2 checkpoint
    and resumed; steps that neither log nor save read nothing from the device; the export loads."""
    common = ("model.family=dit_edm", "train.zero_stage=2", "train.steps=4", "run.ckpt_every=2", "run.log_every=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_entry("train.py", train_args(tiny, straight, *common, "debug.count_host_reads=true"), num_procs=2))
    for rank in range(2):
        steps = quiet_steps(straight, rank)
        assert [s["step"] for s in steps] == [1, 3] and all(s["by_origin"].get("project", 0) == 0 for s in steps)
    metrics = read_metrics(straight)
    assert [m["step"] for m in metrics] == [2, 4] and all(np.isfinite(m["loss/total"]) for m in metrics)
    assert sum(m[key] is not None for m in metrics for key in m if key.startswith("loss_t/")) > 2  # sigma bands
    # The run as it was when it stopped after step 2: its checkpoint, its log, nothing later.
    copy_as_stopped_after(straight, resumed, 2)
    assert_ok(run_entry("train.py", train_args(tiny, resumed, *common) + ["--resume"], num_procs=2))
    assert_same_run(straight, resumed, steps={4}, rtol=1e-6)

    export = straight / "export" / "ema"
    assert EDMEulerScheduler.from_pretrained(export / "scheduler").config.sigma_data == 0.5
    record = json.loads((export / "noise_process.json").read_text())
    classes = [f"class_{i}" for i in range(4)]
    assert record == {"name": "edm", "p_mean": -1.2, "p_std": 1.2, "sigma_data": 0.5, "classes": classes}
    trained = DiTTransformer2DModel.from_pretrained(export / "transformer").state_dict()
    family = DiTEDMFamily.from_pretrained(str(export))
    assert all(torch.equal(family.denoiser.state_dict()[k], v) for k, v in trained.items())
    images = family.sample(family.denoiser, torch.tensor([0, 3]), num_steps=4, guidance_scale=1.5)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
