"""The loss against a hand computation in float64 numpy, and the source weighting."""

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import assert_ok, read_metrics, run_entry, train_args
from tests.core.test_golden import ARGS as GOLDEN_ARGS
from tests.core.test_golden import GOLDEN
from trainer.config import ConfigError, MethodConfig, load_config
from trainer.loss import NoiseSchedule, diffusion_loss, source_weights, timestep_loss_weights

BETAS = np.linspace(1e-4, 0.02, 1000)


def hand_loss(out, x0, noise, t):
    """One sample, written out from the DDPM formulas with plain Python loops for the schedule."""
    abar = [1.0]
    for b in BETAS:
        abar.append(abar[-1] * (1 - b))
    a_t, a_prev, beta = abar[t + 1], abar[t], BETAS[t]
    c = x0.shape[0]
    eps, v = out[:c], out[c:]
    mse = np.mean((eps - noise) ** 2)
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * noise
    post_var = lambda s: BETAS[s] * (1 - abar[s]) / (1 - abar[s + 1])  # noqa: E731
    min_log = math.log(post_var(1) if t == 0 else post_var(t))
    log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * min_log
    x0_hat = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = lambda x: beta * math.sqrt(a_prev) / (1 - a_t) * x + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t) * x_t  # noqa: E731
    if t > 0:
        kl = 0.5 * (
            -1 + log_var - min_log + np.exp(min_log - log_var) + (mean(x0) - mean(x0_hat)) ** 2 / np.exp(log_var)
        )
        vb = np.mean(kl) / math.log(2)
    else:
        cdf = lambda z: 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))  # noqa: E731
        std = np.exp(0.5 * log_var)
        lo, hi = cdf((x0 - mean(x0_hat) - 1 / 255) / std), cdf((x0 - mean(x0_hat) + 1 / 255) / std)
        logp = np.where(x0 < -0.999, np.log(hi), np.where(x0 > 0.999, np.log(1 - lo), np.log(hi - lo)))
        vb = -np.mean(logp) / math.log(2)
    return mse + vb


@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_diffusion_loss_equals_hand_computation(t):
    rng = np.random.default_rng(t)
    x0 = rng.uniform(-1, 1, (2, 3, 4, 4))
    x0[0, 0, 0] = [-1.0, 1.0, 0.0, 0.5]  # the edge bins of the t = 0 decoder term
    noise = rng.standard_normal((2, 3, 4, 4))
    out = np.concatenate([rng.standard_normal((2, 3, 4, 4)), rng.uniform(-1, 1, (2, 3, 4, 4))], axis=1)
    schedule = NoiseSchedule(BETAS)
    tt = torch.full((2,), t)
    x_t = schedule.add_noise(torch.tensor(x0), torch.tensor(noise), tt)
    got = diffusion_loss(torch.tensor(out), torch.tensor(x0), x_t, torch.tensor(noise), tt, schedule)
    want = [hand_loss(out[i], x0[i], noise[i], t) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_epsilon_only_output_is_plain_mse_and_variance_term_trains_only_variance():
    schedule = NoiseSchedule(BETAS)
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([5, 500, 900])
    x_t = schedule.add_noise(x0, noise, t)
    eps = torch.randn(3, 2, 4, 4)
    np.testing.assert_allclose(diffusion_loss(eps, x0, x_t, noise, t, schedule), ((eps - noise) ** 2).mean((1, 2, 3)))
    out = torch.cat([eps, torch.zeros_like(eps)], 1).requires_grad_()
    loss = diffusion_loss(out, x0, x_t, noise, t, schedule).sum()
    loss.backward()
    mse_grad = torch.autograd.grad(((out[:, :2] - noise) ** 2).mean((1, 2, 3)).sum(), out)[0]
    # the epsilon channels get exactly the MSE gradient: the bound sees a detached epsilon
    torch.testing.assert_close(out.grad[:, :2], mse_grad[:, :2])
    assert out.grad[:, 2:].abs().sum() > 0


def test_source_weights_give_target_mean_plus_lambda_bank_mean():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    is_bank = torch.tensor([True, True, False, False, False])
    w = source_weights(is_bank, num_target=3, num_bank=2, bank_loss_weight=0.1)
    assert float((w * losses).sum()) == pytest.approx((3 + 4 + 10) / 3 + 0.1 * (1 + 2) / 2)
    w = source_weights(torch.zeros(4, dtype=torch.bool), num_target=4, num_bank=0, bank_loss_weight=1.0)
    assert torch.allclose(w, torch.full((4,), 0.25))


# --- timestep re-weighting on top (method.loss_weighting) ---------------------------------------------------------
def hand_snr(t: int) -> float:
    abar = 1.0
    for b in BETAS[: t + 1]:
        abar *= 1 - b
    return abar / (1 - abar)


@pytest.mark.parametrize(
    "method,formula",
    [
        (MethodConfig(loss_weighting="min_snr", min_snr_gamma=5.0), lambda snr: min(snr, 5.0) / snr),
        (MethodConfig(loss_weighting="min_snr", min_snr_gamma=1.0), lambda snr: min(snr, 1.0) / snr),
        (MethodConfig(loss_weighting="min_snr_released", min_snr_gamma=5.0), lambda snr: min(5.0, snr)),
        (MethodConfig(loss_weighting="p2", p2_k=1.0, p2_gamma=1.0), lambda snr: 1 / (1 + snr)),
        (MethodConfig(loss_weighting="p2", p2_k=1.0, p2_gamma=0.5), lambda snr: (1 + snr) ** -0.5),
    ],
)
def test_timestep_weights_equal_their_formulas(method, formula):
    t = [0, 1, 100, 250, 500, 999]
    got = timestep_loss_weights(torch.tensor(t), NoiseSchedule(BETAS), method)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), [formula(hand_snr(s)) for s in t], rtol=1e-6)


def test_min_snr_weights_at_hand_values():
    # SNR(0) = (1 - 1e-4) / 1e-4 = 9999: the weight is gamma / 9999; at t = 999, SNR < 1e-4 and the weight is 1
    w = timestep_loss_weights(torch.tensor([0, 999]), NoiseSchedule(BETAS), MethodConfig(loss_weighting="min_snr"))
    np.testing.assert_allclose(w.numpy(), [5.0 / 9999.0, 1.0], rtol=1e-6)
    w = timestep_loss_weights(torch.tensor([0]), NoiseSchedule(BETAS), MethodConfig(loss_weighting="p2"))
    np.testing.assert_allclose(w.numpy(), [10000.0**-0.5], rtol=1e-6)  # gamma 0.5 by default, as the released code
    # The released code's Min-SNR: min(gamma, SNR): 5 at t = 0, SNR(999) < 1e-4 at the noisiest step
    w = timestep_loss_weights(
        torch.tensor([0, 999]), NoiseSchedule(BETAS), MethodConfig(loss_weighting="min_snr_released")
    )
    np.testing.assert_allclose(w.numpy(), [5.0, hand_snr(999)], rtol=1e-6)


def test_weights_scale_only_the_epsilon_mse_and_none_changes_nothing():
    schedule = NoiseSchedule(BETAS)
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 500, 900])
    x_t = schedule.add_noise(x0, noise, t)
    out = torch.cat([torch.randn(3, 2, 4, 4), torch.rand(3, 2, 4, 4) * 2 - 1], 1)
    plain = diffusion_loss(out, x0, x_t, noise, t, schedule)
    ones = timestep_loss_weights(t, schedule, MethodConfig())
    assert torch.equal(diffusion_loss(out, x0, x_t, noise, t, schedule, ones), plain)
    w = timestep_loss_weights(t, schedule, MethodConfig(loss_weighting="min_snr", min_snr_gamma=1.0))
    mse = ((out[:, :2] - noise) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(diffusion_loss(out, x0, x_t, noise, t, schedule, w), plain - mse + w * mse)


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.loss_weighting=snr", "method.loss_weighting='snr' is not one of"),
        ("method.min_snr_gamma=0", "method.min_snr_gamma=0.0 must be > 0"),
        ("method.p2_k=0", "method.p2_k=0.0 must be > 0"),
        ("method.p2_gamma=-1", "method.p2_gamma=-1.0 >= 0"),
    ],
)
def test_bad_weighting_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", ["model.pretrained=/m", "data.target=/t", override])


@pytest.mark.slow
@pytest.mark.parametrize(
    "weighting", ["method.loss_weighting=min_snr method.min_snr_gamma=1", "method.loss_weighting=p2"]
)
def test_training_with_a_weighting(tiny, tmp_path, weighting):
    """Both weights are <= 1 (p2: < 1) at every t, so the first step (the golden run's model, data and t) has a
    lower total loss than the unweighted golden run, and no source's loss is higher (Min-SNR-1 leaves the weight of
    the noisy steps, SNR <= 1, at 1: target slots mostly draw those); the run trains on with finite, changing losses."""
    run = tmp_path / "run"
    assert_ok(run_entry("train.py", train_args(tiny, run, *GOLDEN_ARGS, *weighting.split())))
    metrics = read_metrics(run)
    losses = np.array([[m["loss/total"], m["loss/target"], m["loss/bank"]] for m in metrics])
    assert len(metrics) == 6 and np.isfinite(losses).all()
    assert len(set(losses[:, 0].tolist())) == len(losses)  # a different loss at every step: it trains
    unweighted = json.loads(GOLDEN.read_text())["losses"]["1"]
    assert losses[0, 0] < unweighted[0] and (losses[0] <= np.array(unweighted) * (1 + 1e-6)).all(), (
        losses[0],
        unweighted,
    )
