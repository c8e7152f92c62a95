"""The flow-matching process: its training distribution of t and its shift equal diffusers' (SD3's sampler shift,
Flux's resolution shift), psi / xi on flow time match their definition, the loss and the loop's per-slot losses
equal a hand computation, bad settings are refused with the reason, and a DiT trained by flow matching trains under
DeepSpeed, resumes exactly and exports a folder that loads and samples with both samplers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from scipy.special import expit, logit
from scipy.stats import chisquare, norm

from data.batch import MicroBatch
from data.sampler import BANK, TARGET, GlobalBatchPlanner, NoiseLevels
from models.dit_flow import DiTFlowFamily
from models.noise.flow import FlowMatchingProcess, FlowTime, resolution_shift
from tests.conftest import assert_ok, copy_as_stopped_after, read_metrics, run_entry, train_args
from tests.core.test_host_reads import quiet_steps
from tests.core.test_train_distributed import assert_same_run
from trainer.config import ConfigError, MethodConfig, load_config
from trainer.evaluation.sampling import Denoiser, sample_images
from trainer.loop import slot_losses

NUM_BINS = 20


@pytest.mark.parametrize("kind,shift", [("logit_normal", 1.0), ("logit_normal", 3.0), ("uniform", 3.0)])
def test_flow_time_quantile_inverts_its_cdf_and_shifts_as_diffusers(kind, shift):
    time = FlowTime(kind, 0.3, 0.8, shift)
    v = np.linspace(1e-6, 1 - 1e-6, 1001)
    np.testing.assert_allclose(time.cdf(time.quantile(v)), v, rtol=1e-9, atol=1e-12)
    # diffusers' flow sampler shifts its times the same way: sigma' = shift sigma / (1 + (shift - 1) sigma)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    np.testing.assert_allclose(
        FlowTime("uniform", shift=shift).quantile(unshifted.sigmas.double().numpy()), scheduler.sigmas.numpy(),
        rtol=1e-6,
    )  # fmt: skip


def test_resolution_shift_is_fluxs():
    for tokens in (64, 256, 1024, 4096):
        assert resolution_shift(tokens) == pytest.approx(np.exp(calculate_shift(tokens)), rel=1e-12)


def expected_bin_masses(weight, edges: np.ndarray, mean: float, std: float, shift: float) -> np.ndarray:
    """Masses of bins of t under p(t) * weight(t), by quadrature in logit of the unshifted time, straight from the
    definition (logit s ~ N(mean, std^2), t = shift s / (1 + (shift - 1) s)), not the sampler's inverse CDF."""
    z = np.linspace(mean - 9 * std, mean + 9 * std, 400_001)
    s = expit(z)
    t = shift * s / (1 + (shift - 1) * s)
    density = norm.pdf(z, mean, std) * weight(t)
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(z))])
    at_edges = np.interp(edges, t, cumulative)
    return np.diff(at_edges) / cumulative[-1]


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_flow_psi_and_xi_histograms_match_their_definition(tau):
    mean, std, shift = 0.0, 1.0, 3.0
    split = FlowMatchingProcess("logit_normal", mean, std, shift).split(MethodConfig(tau=tau))
    assert isinstance(split, NoiseLevels)
    grid = np.linspace(0.01, 0.99, 99)
    s = grid / (shift - (shift - 1) * grid)
    np.testing.assert_allclose(split.psi(grid), norm.cdf((logit(s) - mean) / std) ** tau, rtol=1e-12)
    np.testing.assert_allclose(split.psi(grid) + split.xi(grid), 1.0, rtol=0, atol=1e-15)
    planner = GlobalBatchPlanner(
        global_batch_size=512, num_target=64, num_bank=64, bank_ratio=0.5, split=split, label_dropout=0.1, seed=3
    )
    plans = [planner.plan(step) for step in range(50)]
    t = {source: np.concatenate([p.t[p.source == source] for p in plans]) for source in (TARGET, BANK)}
    assert len(t[TARGET]) == len(t[BANK]) == 12_800 and all(((0 < x) & (x < 1)).all() for x in t.values())
    assert t[TARGET].mean() > t[BANK].mean()  # psi rises toward noise (t = 1)
    edges = split.distribution.quantile(np.arange(NUM_BINS + 1) / NUM_BINS)  # equal mass under p(t)
    edges[0], edges[-1] = 0.0, 1.0
    masses = {
        TARGET: expected_bin_masses(split.psi, edges, mean, std, shift),
        BANK: expected_bin_masses(split.xi, edges, mean, std, shift),
    }
    for source, other in ((TARGET, BANK), (BANK, TARGET)):
        observed = np.histogram(t[source], edges)[0]
        assert chisquare(observed, masses[source] * observed.sum()).pvalue > 1e-3
        assert chisquare(observed, masses[other] * observed.sum()).pvalue < 1e-6  # the test can fail
        assert chisquare(observed, np.full(NUM_BINS, observed.sum() / NUM_BINS)).pvalue < 1e-6


def test_flow_loss_and_slot_losses_match_the_hand_computation(tiny):
    family = DiTFlowFamily.from_pretrained(str(tiny["pretrained"]), num_classes=4)
    process, generator = family.noise_process, torch.Generator().manual_seed(0)
    assert (process.time.kind, process.time.shift) == ("logit_normal", 1.0)
    t = torch.tensor([0.001, 0.3, 0.7, 0.999], dtype=torch.float64)
    x0, noise = torch.rand((4, 3, 8, 8), generator=generator) * 2 - 1, torch.randn((4, 3, 8, 8), generator=generator)
    labels, null = torch.tensor([0, 3, 2, 1]), torch.tensor([False, False, True, False])
    batch = MicroBatch(x0, noise, t, {"label": labels}, null, torch.zeros(4, dtype=torch.bool), np.zeros((4, 3)))
    got = slot_losses(family, family.denoiser, batch, process, torch.float32, MethodConfig())

    s = t.numpy()[:, None, None, None]
    x_t = (1 - s) * x0.double().numpy() + s * noise.double().numpy()
    with torch.no_grad():
        velocity = family.denoiser(
            torch.from_numpy(x_t).float(), timestep=(t * 1000).float(), class_labels=torch.where(null, 4, labels)
        ).sample[:, :3]
    target = noise.double().numpy() - x0.double().numpy()
    expected = ((velocity.double().numpy() - target) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4)
    # The clean estimate of the exact velocity is x0; the SNR of x_t is ((1 - t) / t)^2.
    exact = process.denoised(noise - x0, process.add_noise(x0, noise, t), t)
    torch.testing.assert_close(exact, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(process.snr(t), ((1 - t) / t) ** 2)
    bands = torch.tensor([0.05, 0.4, 0.6, 0.95], dtype=torch.float64)  # quartiles of logit-normal (0, 1): .34 .5 .66
    assert process.level_bucket(bands, 4).tolist() == [0, 1, 2, 3]
    assert process.level_bucket(t, 4).tolist() == (np.floor(process.time.cdf(t.numpy()) * 4)).astype(int).tolist()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["noise.shift=3"], "model.family=dit: noise.shift=3.0 sets the flow-matching time distribution of a "
         "rectified-flow process, but this family trains the discrete DDPM process"),
        (["model.family=dit_edm", "noise.logit_std=2"], "but this family trains the EDM process"),
        (["model.family=dit_flow", "noise.p_mean=-1"], "noise.p_mean=-1.0 sets the continuous sigma distribution of an "
         "EDM process, but this family trains the flow-matching process"),
        (["model.family=dit_flow", "method.timestep_weights=mirrored"], "on flow time Diff-Tuning uses psi = CDF"),
        (["model.family=dit_flow", "method.loss_weighting=p2"], "a flow model is trained on velocity"),
        (["model.family=dit_flow", "noise.shift=0"], r"noise.shift=0.0 must be > 0 \(SD3: logit_std 1.0, shift 3.0"),
        (["model.family=dit_flow", "noise.t_distribution=beta"], "noise.t_distribution='beta' is not one of"),
    ],
)  # fmt: skip
def test_bad_flow_settings_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_flow_family_has_no_betas_and_takes_noise_settings(tiny):
    noise = load_config(overrides=["model.family=dit_flow", "noise.shift=3", "noise.t_distribution=uniform"]).noise
    family = DiTFlowFamily.from_pretrained(str(tiny["pretrained"]), noise=noise)
    assert family.noise_process.settings() == {"t_distribution": "uniform", "logit_mean": 0.0, "logit_std": 1.0,
                                               "shift": 3.0}  # fmt: skip
    assert family.sampling_scheduler().config.shift == 3.0
    with pytest.raises(ValueError, match="model.family=dit_flow trains by flow matching"):
        family.betas()


@pytest.mark.slow
def test_flow_family_trains_zero2_resumes_exactly_and_exports_what_loads(tiny, tmp_path):
    """4 steps straight (2 ranks, ZeRO-2, Diff-Tuning on flow time, SD3's shift) == the run stopped at its step-2
    checkpoint and resumed; quiet steps read nothing from the device; the export loads and samples."""
    common = ("model.family=dit_flow", "noise.shift=3", "train.zero_stage=2", "train.steps=4", "run.ckpt_every=2",
              "run.log_every=2")  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_entry("train.py", train_args(tiny, straight, *common, "debug.count_host_reads=true"), num_procs=2))
    for rank in range(2):
        steps = quiet_steps(straight, rank)
        assert [s["step"] for s in steps] == [1, 3] and all(s["by_origin"].get("project", 0) == 0 for s in steps)
    metrics = read_metrics(straight)
    assert [m["step"] for m in metrics] == [2, 4] and all(np.isfinite(m["loss/total"]) for m in metrics)
    copy_as_stopped_after(straight, resumed, 2)
    assert_ok(run_entry("train.py", train_args(tiny, resumed, *common) + ["--resume"], num_procs=2))
    assert_same_run(straight, resumed, steps={4}, rtol=1e-6)

    export = straight / "export" / "ema"
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(export / "scheduler").config.shift == 3.0
    record = json.loads((export / "noise_process.json").read_text())
    assert record == {"name": "flow", "t_distribution": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                      "shift": 3.0, "classes": [f"class_{i}" for i in range(4)]}  # fmt: skip
    trained = DiTTransformer2DModel.from_pretrained(export / "transformer").state_dict()
    family = DiTFlowFamily.from_pretrained(str(export))
    assert family.noise_process.time.shift == 3.0
    assert all(torch.equal(family.denoiser.state_dict()[k], v) for k, v in trained.items())
    images = family.sample(family.denoiser, torch.tensor([0, 3]), num_steps=4, guidance_scale=1.5)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    chain, noise = [(Denoiser(family, family.denoiser), 4)], torch.randn((2, 3, 8, 8))
    for sampler in family.samplers:  # the evaluation's sampling path, with each of the family's samplers
        pixels = sample_images(chain, {"label": torch.tensor([1, 2])}, noise, sampler, 4, 1.5)
        assert pixels.shape == (2, 3, 8, 8) and pixels.dtype == torch.uint8, sampler
