"""launch/evaluate.py: metrics of sampled sets, the same on 1 and 2 ranks, resumable; the forgetting analyses."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.shard_jobs import is_complete, shard_ranges, sidecar_path
from data.shards import MANIFEST_NAME, read_manifest
from models import family_class
from models.feature_net import FeatureNet, save_feature_net
from tests.conftest import ROOT, assert_ok, child_env, run_entry
from tests.tiny import make_tiny_dit
from trainer.config import load_config
from trainer.evaluation.analyses import parameter_drift
from trainer.evaluation.evaluate import evaluate
from trainer.evaluation.features import FeatureExtractor, frechet_distance, kernel_distance, precision_recall
from trainer.evaluation.sampling import Denoiser, sample_images

slow = pytest.mark.slow
NUM_SAMPLES, PER_SHARD = 24, 3  # 8 shards


@pytest.fixture(scope="module")
def kit(tiny, tmp_path_factory) -> dict[str, Path]:
    """A 'fine-tuned' model (other weights, same architecture as tiny's pre-trained one) and a small feature net."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    save_feature_net(FeatureNet(num_features=16, width=8), root / "feature_net.pt")
    return {**tiny, "finetuned": make_tiny_dit(root / "finetuned", seed=1), "feature_net": root / "feature_net.pt"}


def eval_args(kit: dict, out: Path, *overrides: str) -> list[str]:
    return [
        "--config", "tiny_cpu", f"eval.model={kit['finetuned']}", f"eval.reference={kit['target']}",
        f"eval.feature_net={kit['feature_net']}", f"eval.out={out}", f"eval.cache={out}_cache",
        f"eval.num_samples={NUM_SAMPLES}", f"eval.samples_per_shard={PER_SHARD}", "eval.batch_size=2",
        "eval.sample_steps=4", "eval.kid_subsets=5", "eval.grid_images=8", *overrides,
    ]  # fmt: skip


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["results"]


def shard_hashes(directory: Path) -> list[str]:
    return [record.sha256 for record in read_manifest(directory).shards]


@pytest.fixture(scope="module")
def one_rank(kit, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank") / "eval"
    proc = run_entry("evaluate.py", eval_args(kit, out))
    assert_ok(proc)
    assert f"samples: {NUM_SAMPLES} sampled (0 already complete)" in proc.stdout
    return out


def images(seed: int, smooth: bool, num: int = 64) -> torch.Tensor:
    """uint8 8x8 images: smooth colour gradients, or uniform noise (another distribution)."""
    generator = torch.Generator().manual_seed(seed)
    if not smooth:
        return torch.randint(0, 256, (num, 3, 8, 8), generator=generator, dtype=torch.uint8)
    ramp = torch.linspace(0, 1, 8)
    colour = torch.rand((num, 3, 1, 1), generator=generator)
    return (255 * colour * (ramp[None, None, :, None] + ramp[None, None, None, :]) / 2).round().to(torch.uint8)


def test_metrics_of_a_set_against_itself_and_another_distribution(kit):
    extractor = FeatureExtractor(FeatureNet(num_features=16, width=8), "feature_net", "-", torch.device("cpu"))
    smooth, smooth_again, noise = (extractor(images(seed, smooth)) for seed, smooth in ((0, 1), (1, 1), (2, 0)))
    for part in (0, 1):  # pooled features (FID) and spatial features (sFID)
        same = frechet_distance(smooth[part], smooth[part])
        other = frechet_distance(smooth[part], noise[part])
        assert abs(same) < 1e-6 * other and other > 10 * frechet_distance(smooth[part], smooth_again[part])
    assert precision_recall(smooth[0], smooth[0]) == (1.0, 1.0)
    assert precision_recall(smooth[0], noise[0])[0] == 0.0  # no noise image lies in the smooth images' manifold
    assert (
        abs(kernel_distance(smooth[0], smooth[0], 5, 32, seed=0)[0])
        < 1e-2 * kernel_distance(smooth[0], noise[0], 5, 32, seed=0)[0]
    )


def test_missing_inception_weights_stop_before_any_work(kit, tmp_path):
    out = tmp_path / "eval"
    args = eval_args(kit, out, f"eval.inception={tmp_path / 'pt_inception-2015-12-05-6726825d.pth'}")
    cfg = load_config(args[1], [a for a in args[2:] if not a.startswith("eval.feature_net")])
    with pytest.raises(FileNotFoundError, match=r"eval.inception=.*pt_inception-2015-12-05-6726825d.pth.*fid_weights"):
        evaluate(cfg)
    assert not out.exists()


def test_l2_ewc_equals_a_hand_computation(kit):
    model = family_class("dit").from_pretrained(str(kit["finetuned"])).denoiser
    pretrained = family_class("dit").from_pretrained(str(kit["pretrained"])).denoiser
    drift = parameter_drift(model, pretrained)
    theirs = dict(pretrained.state_dict())
    by_hand = sum(
        float(((p.double() - theirs[name].double()) ** 2).sum())
        for name, p in model.named_parameters()
        if "class_embedder" not in name
    )
    assert drift["l2_ewc"] == pytest.approx(by_hand, rel=1e-12) and by_hand > 0
    assert sum(drift["groups"].values()) == pytest.approx(by_hand, rel=1e-12)
    assert "transformer_blocks.1" in drift["groups"] and drift["label_tables"] and not drift["not_compared"]
    assert parameter_drift(model, model)["l2_ewc"] == 0.0


def test_replacement_chain_ends_are_the_two_models(kit):
    fine, pre = (family_class("dit").from_pretrained(str(kit[name])) for name in ("finetuned", "pretrained"))
    fine_tuned = Denoiser(fine, fine.denoiser.eval())
    pretrained = Denoiser(pre, pre.denoiser.eval(), null=True)  # eval.handover_labels=null
    labels, noise = torch.tensor([0, 1, 2, 3]), torch.randn((4, *fine.sample_shape), generator=torch.Generator())
    steps = 6

    def chain(late: int, sampler: str = "ddim") -> torch.Tensor:
        parts = [(fine_tuned, steps - late), (pretrained, late)]
        return sample_images([p for p in parts if p[1]], {"label": labels}, noise, sampler, steps, 1.5)

    def alone(family, condition: torch.Tensor) -> torch.Tensor:  # the family's own DDIM sampler, uint8
        x = family.sample(family.denoiser, condition, num_steps=steps, guidance_scale=1.5, noise=noise)
        return ((x + 1) * 127.5).round().to(torch.uint8)

    assert torch.equal(chain(0), alone(fine, labels))
    assert torch.equal(chain(steps), alone(pre, torch.full_like(labels, pre.null_condition)))
    assert not torch.equal(chain(3), chain(0)) and not torch.equal(chain(3), chain(steps))
    assert not torch.equal(chain(0, "dpm++"), chain(0))  # another solver, same noise


@slow
def test_one_and_two_ranks_give_the_same_samples_and_metrics(kit, one_rank, tmp_path):
    out = tmp_path / "eval"
    proc = run_entry("evaluate.py", eval_args(kit, out), num_procs=2)
    assert_ok(proc)
    assert "on 2 rank(s)" in proc.stdout
    assert shard_hashes(out / "samples") == shard_hashes(one_rank / "samples")
    assert results(out) == results(one_rank)
    row = results(one_rank)["samples"]
    assert row["fid"] > 0 and 0 <= row["precision"] <= 1 and (one_rank / "grid_samples.png").is_file()


@slow
def test_killed_evaluation_redoes_only_missing_shards(kit, one_rank, tmp_path):
    out, samples = tmp_path / "eval", tmp_path / "eval" / "samples"
    command = [sys.executable, str(ROOT / "launch" / "evaluate.py"), *eval_args(kit, out)]
    job = subprocess.Popen(command, env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while job.poll() is None and not sidecar_path(samples, 1).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL, "the evaluation ended before it could be killed: make it slower"
    ranges = shard_ranges(NUM_SAMPLES, PER_SHARD)
    complete = [j for j in range(len(ranges)) if is_complete(samples, j, ranges[j])]
    assert 1 <= len(complete) < len(ranges) and not (samples / MANIFEST_NAME).exists()
    before = {j: (samples / f"shard-{j:06d}.tar").stat().st_mtime_ns for j in complete}

    proc = run_entry("evaluate.py", eval_args(kit, out))
    assert_ok(proc)
    done = sum(len(ranges[j]) for j in complete)
    assert f"samples: {NUM_SAMPLES - done} sampled ({done} already complete)" in proc.stdout
    assert {j: (samples / f"shard-{j:06d}.tar").stat().st_mtime_ns for j in complete} == before
    assert shard_hashes(samples) == shard_hashes(one_rank / "samples") and results(out) == results(one_rank)


@slow
def test_replacement_curve_and_denoising_modes(kit, one_rank, tmp_path):
    out = tmp_path / "replacement"
    proc = run_entry("evaluate.py", eval_args(kit, out, "eval.mode=replacement", f"eval.pretrained={kit['pretrained']}",
                                              "eval.handover=[0,0.5,1]"))  # fmt: skip
    assert_ok(proc)
    rows = results(out)
    assert list(rows) == ["handover_000", "handover_050", "handover_100"] and (out / "replacement.png").is_file()
    assert shard_hashes(out / "handover_000") == shard_hashes(one_rank / "samples")  # p = 0: the fine-tuned model
    assert rows["handover_000"] == results(one_rank)["samples"] | {"handover": 0.0}
    assert len({row["fid"] for row in rows.values()}) == 3

    out = tmp_path / "denoising"
    models = f"eval.models=[pre={kit['pretrained']},fine={kit['finetuned']}]"
    args = eval_args(kit, out, "eval.mode=denoising", models, f"data.bank={kit['bank']}", "eval.bands=[0,500,1000]")
    proc = run_entry("evaluate.py", args, num_procs=2)
    assert_ok(proc)
    errors = json.loads((out / "denoising.json").read_text())["errors"]
    assert set(errors) == {"pre", "fine"} and set(errors["pre"]) == {"target", "bank"}
    assert all(0 < e < 10 for model in errors.values() for band in model.values() for e in band)
    assert errors["pre"] != errors["fine"] and (out / "denoising.png").is_file()
    single = run_entry("evaluate.py", eval_args(kit, tmp_path / "one", *args[args.index("eval.mode=denoising") :]))
    assert_ok(single)
    assert json.loads((tmp_path / "one" / "denoising.json").read_text())["errors"] == errors


def test_slurm_template_runs_the_evaluation_on_every_gpu():
    from tests.slurm.test_slurm import dry_run

    out = dry_run("launch/slurm/evaluate.sbatch", "eval.model=/runs/a", "eval.out=/runs/a/eval")
    assert "--ntasks-per-node=4 --cpus-per-task=8 python launch/evaluate.py --config dit_xl2_paper " \
           "eval.model=/runs/a" in out  # fmt: skip


def test_an_image_folder_reference_reads_as_uint8_at_the_sample_size(kit, tmp_path):
    from data import procedural
    from trainer.evaluation.data import open_image_set

    folder = procedural.write_image_folder("target", tmp_path / "images", 2, seed=0, size=16)
    family = family_class("dit").from_pretrained(str(kit["finetuned"]))
    reference = open_image_set(str(folder), family, image_size=8)
    batch = reference.read(range(reference.num_images))
    assert batch.dtype == torch.uint8 and batch.shape == (2 * procedural.NUM_CLASSES, 3, 8, 8)
    assert len(reference.classes) == procedural.NUM_CLASSES and batch.float().std() > 0
    assert open_image_set(str(folder), family, image_size=16).fingerprint != reference.fingerprint


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.mode=fid", "eval.mode='fid' is not one of"),
        ("eval.sampler=euler", "eval.sampler='euler' is not one of"),
        ("eval.handover=[0,1.5]", "every share p must lie in [0, 1]"),
        ("eval.mode=drift", "eval.mode=drift needs eval.pretrained set"),
        ("eval.feature_net=null", "set exactly one of eval.inception"),
    ],
)
def test_bad_evaluation_settings_are_named(kit, tmp_path, override, message):
    args = eval_args(kit, tmp_path / "eval", override)
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(load_config(args[1], args[2:]))
    assert not (tmp_path / "eval").exists()


def test_an_edm_model_is_evaluated_with_its_own_samplers(kit, tmp_path):
    """dit_edm: sample i is the family's own Euler sampler from the noise of (seed, i) (DPM-Solver++ on request);
    a DDPM sampler or the DDPM-timestep denoising analysis is refused with the reason."""
    from data.formats import open_shard_set
    from data.shard_jobs import derived_seed
    from models.dit_edm import DiTEDMFamily

    edm = DiTEDMFamily.from_pretrained(str(kit["pretrained"]), num_classes=4)
    edm.export(edm.denoiser.state_dict(), tmp_path / "edm")
    common = ["model.family=dit_edm", f"eval.model={tmp_path / 'edm'}", "eval.sample_steps=3"]
    rows = {}
    for sampler in ("", "dpm++"):
        out = tmp_path / f"eval_{sampler or 'own'}"
        args = eval_args(kit, out, *common, *([f"eval.sampler={sampler}"] if sampler else []))
        rows[sampler] = evaluate(load_config(args[1], args[2:]))
        assert rows[sampler]["sampler"] == (sampler or "euler") and rows[sampler]["results"]["samples"]["fid"] > 0
    samples = open_shard_set(tmp_path / "eval_own" / "samples")
    noise = torch.randn((1, *edm.sample_shape), generator=torch.Generator().manual_seed(derived_seed(0, 3)))
    by_hand = edm.sample(edm.denoiser.eval(), torch.tensor([3]), num_steps=3, guidance_scale=1.5, noise=noise)
    by_hand = ((by_hand[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert samples[3]["label"] == 3 and (by_hand == samples[3]["image"]).all()
    other = open_shard_set(tmp_path / "eval_dpm++" / "samples")
    assert not (other[3]["image"] == samples[3]["image"]).all()
    for override, message in (
        ("eval.sampler=ddim", "eval.sampler='ddim' is not one of model.family=dit_edm's samplers ('euler', 'dpm++')"),
        ("eval.mode=denoising", "eval.mode=denoising measures the error per band of DDPM timesteps"),
    ):
        args = eval_args(kit, tmp_path / "refused", *common, override, f"eval.models=[{tmp_path / 'edm'}]")
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate(load_config(args[1], args[2:]))
