"""The global-batch planner: counts, timestep distributions, layout invariance, epochs, null conditions."""

import numpy as np
import pytest
from scipy.stats import chisquare

from data.batch import load_micro_batch
from data.sampler import BANK, TARGET, GlobalBatchPlanner, TimestepSplit, num_bank_slots, slot_draws, slot_ids, uniform
from models.noise.ddpm import DDPMProcess
from trainer.config import ConfigError, MethodConfig, load_config


def planner(global_batch_size=32, bank_ratio=0.5, num_target=100, num_bank=60, **kw):
    kw = {"split": TimestepSplit(), "label_dropout": 0.1, "seed": 7, **kw}
    return GlobalBatchPlanner(
        global_batch_size=global_batch_size, num_target=num_target, num_bank=num_bank, bank_ratio=bank_ratio, **kw
    )


@pytest.mark.parametrize(
    "batch,ratio,rounding,expected",
    [
        (32, 0.5, "round", 16),
        (32, 0.2, "floor", 6),
        (32, 0.2, "round", 6),
        (10, 0.25, "round", 3),
        (10, 0.25, "floor", 2),
        (7, 0.5, "round", 4),
        (8, 0.0, "round", 0),
        (24, 1 / 3, "round", 8),
    ],
)
def test_exact_bank_counts(batch, ratio, rounding, expected):
    assert num_bank_slots(batch, ratio, rounding) == expected
    p = planner(global_batch_size=batch, bank_ratio=ratio, bank_rounding=rounding)
    for step in (0, 1, 17):
        plan = p.plan(step)
        assert plan.is_bank.sum() == expected
        assert len(plan.t) == batch


def test_timestep_histograms_match_psi_and_xi():
    split = TimestepSplit(num_timesteps=1000, tau=1.0)
    p = planner(split=split)
    plans = [p.plan(step) for step in range(400)]
    t_target = np.concatenate([pl.t[pl.source == TARGET] for pl in plans])
    t_bank = np.concatenate([pl.t[pl.source == BANK] for pl in plans])
    p_target, p_bank = split.probabilities()
    bins = np.arange(0, 1001, 50)
    for sample, probs, other in ((t_target, p_target, p_bank), (t_bank, p_bank, p_target)):
        observed = np.histogram(sample, bins)[0]
        expected = np.add.reduceat(probs, bins[:-1]) * len(sample)
        assert chisquare(observed, expected).pvalue > 1e-3
        # The same test rejects the other source's distribution: it has the power to fail.
        assert chisquare(observed, np.add.reduceat(other, bins[:-1]) * len(sample)).pvalue < 1e-6


def test_released_mirrored_weights_and_plain_finetuning():
    psi, xi = TimestepSplit(num_timesteps=4, weights="mirrored", tau=1.0, bank_tau=2.0).probabilities()
    np.testing.assert_allclose(psi, np.array([1, 2, 3, 4]) / 10)
    np.testing.assert_allclose(xi, np.array([16, 9, 4, 1]) / 30)
    psi, xi = TimestepSplit(num_timesteps=4, tau=0.0).probabilities()  # tau = 0: psi = 1, plain fine-tuning
    np.testing.assert_allclose(psi, 0.25)
    assert xi.sum() == 0
    with pytest.raises(ValueError, match="bank timestep distribution is zero"):
        planner(split=TimestepSplit(tau=0.0))


def test_logsnr_weights_and_bank_truncation_equal_a_hand_computation():
    """Our options: psi = sigmoid((center - logSNR(t)) / width) on DiT's schedule, xi = 1 - psi, and no bank draws
    above bank_max_t; computed here by hand from the betas."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    log_snr = np.log(abar / (1 - abar))
    method = MethodConfig(timestep_weights="logsnr", logsnr_center=-2.5, logsnr_width=0.5, bank_max_t=800)
    split = DDPMProcess(betas).split(method)
    psi = 1 / (1 + np.exp(-(-2.5 - log_snr) / 0.5))
    xi = np.where(np.arange(1000) > 800, 0.0, 1 - psi)
    p_target, p_bank = split.probabilities()
    np.testing.assert_allclose(p_target, psi / psi.sum(), rtol=1e-9)
    np.testing.assert_allclose(p_bank, xi / xi.sum(), rtol=1e-9)
    assert p_bank[801:].sum() == 0 and abs(psi[500] - 0.5) < 0.05  # DiT's logSNR(500) is about -2.5
    assert split.mean_weights() == pytest.approx((psi.mean(), xi.mean()))
    assert TimestepSplit().mean_weights() == pytest.approx((0.4995, 0.5005))  # the paper's psi = t/T: r = 1/2
    # Drawn as defined, and the same slots whatever the layout (invariant 1).
    p = planner(global_batch_size=64, split=split)
    plans = [p.plan(step) for step in range(200)]
    t_bank = np.concatenate([pl.t[pl.source == BANK] for pl in plans])
    assert t_bank.max() <= 800
    bins = np.append(np.arange(0, 651, 50), 1000)  # one tail bin: xi is nearly 0 above t = 650 and 0 above 800
    observed = np.histogram(t_bank, bins)[0]
    assert chisquare(observed, np.add.reduceat(p_bank, bins[:-1]) * len(t_bank)).pvalue > 1e-3
    whole = p.plan(7)
    for slots in (np.arange(0, 64, 2), np.array([63, 5, 17])):
        assert slot_tuples(p.plan(7, slots), range(len(slots))) == slot_tuples(whole, slots)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.timestep_weights=logsnr", "method.logsnr_width=0"], "method.logsnr_width=0.0 must be > 0"),
        (["method.bank_max_t=-1"], "method.bank_max_t=-1 >= 0"),
        (["model.family=dit_edm", "method.bank_max_t=500"], "method.bank_max_t=500 truncates the bank at an integer"),
        (["model.family=dit_flow", "method.timestep_weights=logsnr"], "logsnr: the mirrored and logsnr weights"),
    ],
)  # fmt: skip
def test_bad_logsnr_and_truncation_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def slot_tuples(plan, slots):
    return [(plan.source[s], plan.index[s], plan.t[s], plan.noise_seed[s], plan.null_condition[s]) for s in slots]


@pytest.mark.parametrize("world_size,accumulation", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1), (4, 2), (8, 4)])
def test_step_slots_identical_for_any_layout(world_size, accumulation):
    batch = 32
    micro = batch // (world_size * accumulation)
    reference = planner().plan(5)
    seen, bank_per_rank = [], []
    for rank in range(world_size):
        bank = 0
        for m in range(accumulation):
            slots = slot_ids(
                rank=rank, micro_step=m, world_size=world_size, accumulation_steps=accumulation, micro_batch_size=micro
            )
            plan = planner().plan(5, slots)  # each rank plans its own slots alone, as separate processes do
            seen += slot_tuples(plan, range(len(slots)))
            bank += plan.is_bank.sum()
        bank_per_rank.append(bank)
    assert sorted(seen) == sorted(slot_tuples(reference, range(batch)))
    assert len(seen) == batch
    assert max(bank_per_rank) - min(bank_per_rank) <= 1


def test_micro_batch_tensors_do_not_depend_on_the_layout():
    rng = np.random.default_rng(0)
    target = [{"x": rng.standard_normal((3, 4, 4)).astype(np.float32), "label": i % 5} for i in range(50)]
    bank = [{"x": rng.standard_normal((3, 4, 4)).astype(np.float32), "label": 9} for i in range(20)]
    plan = planner(global_batch_size=8, num_target=50, num_bank=20).plan(3)
    whole = load_micro_batch(plan, np.arange(8), {TARGET: target, BANK: bank})
    for rank in range(2):
        slots = slot_ids(rank=rank, micro_step=0, world_size=2, accumulation_steps=1, micro_batch_size=4)
        rank_plan = planner(global_batch_size=8, num_target=50, num_bank=20).plan(3, slots[::-1])
        part = load_micro_batch(rank_plan, slots, {TARGET: target, BANK: bank})
        assert np.array_equal(part.noise.numpy(), whole.noise.numpy()[slots])
        assert np.array_equal(part.x0.numpy(), whole.x0.numpy()[slots])


def test_bank_slots_carry_the_null_condition_and_target_dropout_rate():
    p = planner(label_dropout=0.1)
    plans = [p.plan(step) for step in range(300)]
    assert all(pl.null_condition[pl.is_bank].all() for pl in plans)
    dropped = np.concatenate([pl.null_condition[~pl.is_bank] for pl in plans])
    assert 0.08 < dropped.mean() < 0.12
    assert not any(planner(label_dropout=0.0).plan(s).null_condition[16:].any() for s in range(20))


def test_each_source_walks_a_permutation_per_epoch():
    p = planner(global_batch_size=10, bank_ratio=0.3, num_target=21, num_bank=9)
    target = np.concatenate([p.plan(s).index[p.plan(s).source == TARGET] for s in range(9)])  # 63 = 3 epochs
    bank = np.concatenate([p.plan(s).index[p.plan(s).source == BANK] for s in range(9)])  # 27 = 3 epochs
    for draws, size in ((target, 21), (bank, 9)):
        epochs = draws.reshape(3, size)
        assert all(sorted(e) == list(range(size)) for e in epochs)
        assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_plans_depend_on_seed_and_step_only():
    a, b = planner(seed=1), planner(seed=1)
    b.plan(40)  # planning other steps first changes nothing
    for step in (0, 3, 11):
        pa, pb = a.plan(step), b.plan(step)
        for field in ("source", "index", "t", "noise_seed", "null_condition"):
            assert np.array_equal(getattr(pa, field), getattr(pb, field))
    assert not np.array_equal(planner(seed=2).plan(0).t, a.plan(0).t)


FIELDS = ("source", "index", "t", "noise_seed", "null_condition", "flip")


@pytest.mark.parametrize("step", [0, 4, 9])  # step 4 crosses an epoch of the target, step 9 of the bank
def test_a_plan_of_some_slots_equals_the_whole_plan_indexed_by_them(step):
    p = planner(global_batch_size=24, bank_ratio=0.25, num_target=37, num_bank=11)
    whole = p.plan(step)
    assert np.array_equal(whole.slots, np.arange(24))
    rng = np.random.default_rng(step)
    for slots in (rng.permutation(24)[:7], np.array([23, 0, 5]), np.arange(24)[::-1], np.empty(0, np.int64)):
        part = planner(global_batch_size=24, bank_ratio=0.25, num_target=37, num_bank=11).plan(step, slots)
        assert np.array_equal(part.slots, slots) and part.step == step
        for field in FIELDS:
            assert np.array_equal(getattr(part, field), getattr(whole, field)[slots]), field
        assert np.array_equal(part.positions(slots[::-1]), np.arange(len(slots))[::-1])
    with pytest.raises(KeyError, match=r"holds no slots \[5\]"):
        p.plan(step, [1, 2]).positions([2, 5])
    with pytest.raises(IndexError, match="slot ids must lie in 0..23"):
        p.plan(step, [3, 24])


def test_slot_draws_are_counter_based_and_uniform():
    slots = np.arange(4096)
    draws = slot_draws(7, 3, slots, 4)
    assert draws.shape == (4096, 4) and draws.dtype == np.uint64
    assert np.array_equal(slot_draws(7, 3, slots[[9, 2]], 4), draws[[9, 2]])  # a slot's draws need no other slot
    assert len(np.unique(draws)) == draws.size  # no stream repeats another's values
    for other in (slot_draws(8, 3, slots, 4), slot_draws(7, 4, slots, 4)):  # seed and step both matter
        assert not np.any(other == draws)
    u = uniform(draws)
    assert 0 <= u.min() and u.max() < 1
    for column in u.T:  # each draw is uniform on [0, 1), and the draws of a slot are uncorrelated
        assert chisquare(np.histogram(column, np.linspace(0, 1, 17))[0]).pvalue > 1e-4
    assert np.abs(np.corrcoef(u.T) - np.eye(4)).max() < 0.08


def test_noise_seeds_are_distinct_non_negative_and_flips_fair():
    p = planner(global_batch_size=256)
    plans = [p.plan(step) for step in range(20)]
    seeds = np.concatenate([pl.noise_seed for pl in plans])
    assert seeds.min() >= 0 and len(np.unique(seeds)) == len(seeds)
    flips = np.concatenate([pl.flip for pl in plans])
    assert 0.45 < flips.mean() < 0.55


def test_prior_preservation_keeps_the_bank_condition_and_draws_bank_levels_as_the_target():
    """DreamBooth's baseline (method.bank_condition=own, bank_levels=target): bank slots are never null and their
    levels come from the target's distribution (here tau=0: uniform); target slots keep their dropout rate; the
    slots themselves (sources, indices, noise) are Diff-Tuning's, and any subset of slots plans as the whole."""
    split = TimestepSplit(tau=0.0)  # fine-tuning's uniform t for the target, as DreamBooth trains
    prior = planner(split=split, bank_null_condition=False, bank_levels="target")
    plans = [prior.plan(step) for step in range(300)]
    assert not any(pl.null_condition[pl.is_bank].any() for pl in plans)
    dropped = np.concatenate([pl.null_condition[~pl.is_bank] for pl in plans])
    assert 0.08 < dropped.mean() < 0.12
    bank_t = np.concatenate([pl.t[pl.is_bank] for pl in plans])  # 4,800 draws, uniform over 1000 timesteps
    assert chisquare(np.bincount(bank_t // 100, minlength=10)).pvalue > 1e-3
    with pytest.raises(ValueError, match="timestep distribution is zero everywhere"):
        planner(split=split)  # Diff-Tuning's xi = 1 - psi is 0 at tau = 0: no bank levels to draw
    for step in (0, 7):
        a, b = prior.plan(step), planner(split=TimestepSplit(), bank_null_condition=False, bank_levels="target")
        for field in ("source", "index", "noise_seed", "flip"):
            assert np.array_equal(getattr(a, field), getattr(b.plan(step), field)), field
        assert np.array_equal(prior.plan(step, np.array([20, 3, 9])).t, a.t[[20, 3, 9]])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.bank_levels=psi"], r"method.bank_levels='psi' is not one of \('xi', 'target'\)"),
        (["method.retention=kd", "method.bank_condition=own"], "shape the slots of a bank, but method.retention=kd"),
        (["model.num_classes=4", "model.class_init=fresh", "method.bank_condition=own"],
         "the bank's labels are pre-trained class ids"),
    ],
)  # fmt: skip
def test_bad_prior_preservation_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", ["model.pretrained=x", *overrides])
