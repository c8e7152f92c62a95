"""launch/evaluate.py for SD 1.5 + ControlNet: samples from an evaluation set's prompts and controls (the same on 1 and
2 ranks, resumable), denoising error and ControlNet drift against hand computations, and the bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DDPMScheduler
from PIL import Image

from data.formats import open_shard_set
from data.shard_jobs import derived_seed
from data.shards import MANIFEST_NAME, read_manifest, shard_name, write_manifest, write_shard
from models.feature_net import FeatureNet, save_feature_net
from models.sd_controlnet import SDControlNetFamily
from tests.conftest import assert_ok, run_entry
from tests.tiny_sd import no_leaked_shm, tiny_sd  # noqa: F401 (session fixtures)
from trainer.config import load_config
from trainer.evaluation.evaluate import evaluate
from trainer.evaluation.sampling import Denoiser, sample_images

NUM_SAMPLES, PER_SHARD, NUM_ENTRIES = 10, 3, 8  # 4 shards; samples 8 and 9 take entries 0 and 1 again


@pytest.fixture(scope="module")
def sd_kit(tiny_sd, tmp_path_factory) -> dict:  # noqa: F811
    """A 'fine-tuned' ControlNet (its from_unet start plus a seeded perturbation) as a run's EMA export, and a small
    feature net."""
    root = tmp_path_factory.mktemp("evaluate_sd")
    torch.manual_seed(0)
    save_feature_net(FeatureNet(num_features=16, width=8), root / "feature_net.pt")
    start = SDControlNetFamily.from_pretrained(str(tiny_sd["pretrained"]), seed=0).controlnet  # train.seed=0
    generator = torch.Generator().manual_seed(1)
    delta = {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in start.state_dict().items()}
    start.load_state_dict({k: v + delta[k] for k, v in start.state_dict().items()})
    start.save_pretrained(root / "run" / "export" / "ema")
    drift = sum(float((d.double() ** 2).sum()) for k, d in delta.items() if k in dict(start.named_parameters()))
    return {**tiny_sd, "run": root / "run", "feature_net": root / "feature_net.pt", "drift": drift, "root": root}


def sd_args(kit: dict, out: Path, *overrides: str) -> list[str]:
    return [
        "--config", "tiny_sd_cpu", f"model.pretrained={kit['pretrained']}", f"eval.model={kit['run']}",
        f"eval.data={kit['bank']}", f"eval.reference={kit['target']}", f"eval.feature_net={kit['feature_net']}",
        f"eval.out={out}", f"eval.cache={out}_cache", f"eval.num_samples={NUM_SAMPLES}",
        f"eval.samples_per_shard={PER_SHARD}", "eval.batch_size=2", "eval.sample_steps=3", "eval.cfg_scale=2.0",
        "eval.kid_subsets=3", "eval.grid_images=4", *overrides,
    ]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module compares samples bit for bit with launched ranks (OMP_NUM_THREADS=1): another thread count may
    round the UNet's sums differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def evaluate_in_process(args: list[str]) -> dict:
    return evaluate(load_config(args[1], args[2:]))


def shard_hashes(directory: Path) -> list[str]:
    return [record.sha256 for record in read_manifest(directory).shards]


@pytest.fixture(scope="module")
def one_rank(sd_kit, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd_one_rank") / "eval"
    evaluate_in_process(sd_args(sd_kit, out))
    return out


def test_sd_samples_take_the_evaluation_sets_prompts_and_controls(sd_kit, one_rank):
    results = json.loads((one_rank / "results.json").read_text())
    row = results["results"]["samples"]
    assert np.isfinite([row[k] for k in ("fid", "sfid", "kid")]).all() and row["fid"] > 0
    assert results["data"] == str(sd_kit["bank"]) and results["num_eval_entries"] == NUM_ENTRIES
    samples = open_shard_set(one_rank / "samples")
    assert [samples[i]["meta"]["eval_index"] for i in range(NUM_SAMPLES)] == [i % NUM_ENTRIES for i in range(10)]
    assert samples[0]["image"].shape == (64, 64, 3) and samples[0]["image"].std() > 0
    # Sample 8 takes entry 0's prompt and control with other noise: another image.
    assert not np.array_equal(samples[8]["image"], samples[0]["image"])
    # Each sample by hand: the family's own sampler with entry i mod 8's conditions and the noise of (seed, i).
    family = SDControlNetFamily.from_pretrained(str(sd_kit["pretrained"]))
    controlnet = ControlNetModel.from_pretrained(sd_kit["run"] / "export" / "ema").eval()
    entries = open_shard_set(sd_kit["bank"])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(derived_seed(0, 9)))
    tokens, control = (torch.from_numpy(np.asarray(entries[1][k]))[None] for k in ("tokens", "control"))
    pixels = family.sample(controlnet, tokens, control, num_steps=3, guidance_scale=2.0, noise=noise)
    by_hand = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(by_hand, samples[9]["image"])
    grid = np.asarray(Image.open(one_rank / "grid_samples.png"))
    assert grid.shape[1] > grid.shape[0]  # 2x2 cells, each a control beside its sample: twice as wide as high


def test_sd_replacement_chain_ends_are_the_two_models(sd_kit):
    """The chain of forgetting on SD + ControlNet: with p = 0 the fine-tuned ControlNet samples alone, with p = 1
    the pre-trained model (the ControlNet training starts from, whose zero convolutions leave SD unchanged) under
    the null condition (the default prompt, the control kept); DPM-Solver++ steps the same chain."""
    pre = SDControlNetFamily.from_pretrained(str(sd_kit["pretrained"]), seed=0)
    fine = SDControlNetFamily.from_pretrained(
        str(sd_kit["pretrained"]), controlnet=str(sd_kit["run"] / "export" / "ema")
    )
    fine_tuned, pretrained = Denoiser(fine, fine.denoiser.eval()), Denoiser(pre, pre.denoiser.eval(), null=True)
    entries = open_shard_set(sd_kit["bank"])
    tokens, control = (torch.from_numpy(np.stack([entries[i][k] for i in range(2)])) for k in ("tokens", "control"))
    noise, steps = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)), 4
    fields = {"tokens": tokens, "control": control}

    def chain(late: int, sampler: str = "ddim") -> torch.Tensor:
        parts = [(fine_tuned, steps - late), (pretrained, late)]
        return sample_images([p for p in parts if p[1]], fields, noise, sampler, steps, 2.0)

    def alone(family, prompt_tokens: torch.Tensor) -> torch.Tensor:
        x = family.sample(family.denoiser, prompt_tokens, control, num_steps=steps, guidance_scale=2.0, noise=noise)
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    assert torch.equal(chain(0), alone(fine, tokens))
    assert torch.equal(chain(steps), alone(pre, pre.null_tokens.expand(2, -1)))
    assert not torch.equal(chain(2), chain(0)) and not torch.equal(chain(2), chain(steps))
    assert not torch.equal(chain(0, "dpm++"), chain(0))


def test_a_partly_deleted_sd_sample_set_redoes_only_the_missing_shard(sd_kit, one_rank, tmp_path, capsys):
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(one_rank, out)
    (out / "samples" / MANIFEST_NAME).unlink()
    (out / "samples" / shard_name(2)).unlink()
    evaluate_in_process(sd_args(sd_kit, out, f"eval.cache={one_rank}_cache"))
    assert f"samples: {PER_SHARD} sampled ({NUM_SAMPLES - PER_SHARD} already complete)" in capsys.readouterr().out
    assert shard_hashes(out / "samples") == shard_hashes(one_rank / "samples")
    assert (
        json.loads((out / "results.json").read_text())["results"]
        == json.loads((one_rank / "results.json").read_text())["results"]
    )


@pytest.mark.slow
@pytest.mark.usefixtures("no_leaked_shm")
def test_sd_evaluation_gives_the_same_samples_and_metrics_on_two_ranks(sd_kit, one_rank, tmp_path):
    out = tmp_path / "eval"
    proc = run_entry("evaluate.py", sd_args(sd_kit, out), num_procs=2)
    assert_ok(proc)
    assert f"samples: {NUM_SAMPLES} sampled (0 already complete)" in proc.stdout and "on 2 rank(s)" in proc.stdout
    assert shard_hashes(out / "samples") == shard_hashes(one_rank / "samples")
    assert (
        json.loads((out / "results.json").read_text())["results"]
        == json.loads((one_rank / "results.json").read_text())["results"]
    )


def test_sd_denoising_error_and_controlnet_drift_equal_hand_computations(sd_kit, tmp_path):
    bands, seed = [0, 500, 1000], 3
    args = sd_args(sd_kit, tmp_path / "denoising", "eval.mode=denoising", f"eval.seed={seed}", "eval.num_samples=4",
                   f"eval.models=[pre={sd_kit['pretrained']},fine={sd_kit['run']}]", f"data.bank={sd_kit['bank']}",
                   f"eval.bands=[{','.join(map(str, bands))}]")  # fmt: skip
    errors = evaluate_in_process(args)["errors"]
    assert set(errors) == {"pre", "fine"} and set(errors["pre"]) == {"target", "bank"}
    assert all(np.isfinite(band).all() and len(band) == 2 for model in errors.values() for band in model.values())
    assert errors["pre"]["target"] != errors["fine"]["target"]

    # By hand, band 1 on the bank: SD's own UNet with the default prompt (the ControlNet that from_unet makes
    # of the pre-trained folder adds zeros), and the fine-tuned ControlNet's residuals for the target.
    family = SDControlNetFamily.from_pretrained(str(sd_kit["pretrained"]))
    controlnet = ControlNetModel.from_pretrained(sd_kit["run"] / "export" / "ema").eval()
    scheduler = DDPMScheduler.from_config(family.scheduler_config)

    def by_hand(folder: Path, tokens_of, with_controlnet: bool, band: int) -> float:
        dataset, total = open_shard_set(folder), 0.0
        for i in range(4):
            generator = torch.Generator().manual_seed(derived_seed(seed, i, band))
            t = torch.randint(bands[band], bands[band + 1], (1,), generator=generator)
            noise = torch.randn((1, 4, 8, 8), generator=generator)
            noisy = scheduler.add_noise(torch.from_numpy(dataset[i]["x"])[None], noise, t)
            with torch.no_grad():
                text = family.text_encoder(tokens_of(dataset[i]))[0]
                residuals = {}
                if with_controlnet:
                    control = torch.from_numpy(dataset[i]["control"]).permute(2, 0, 1)[None].float() / 255
                    down, mid = controlnet(noisy, t, text, control, return_dict=False)
                    residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
                epsilon = family.unet(noisy, t, text, **residuals).sample
            total += float(((epsilon - noise) ** 2).mean())
        return total / 4

    default_prompt = lambda item: family.null_tokens[None]  # noqa: E731
    own_prompt = lambda item: torch.from_numpy(np.asarray(item["tokens"])).long()[None]  # noqa: E731
    assert errors["pre"]["bank"][1] == pytest.approx(by_hand(sd_kit["bank"], default_prompt, False, 1), rel=1e-5)
    assert errors["fine"]["target"][0] == pytest.approx(by_hand(sd_kit["target"], own_prompt, True, 0), rel=1e-5)

    # Drift with no eval.pretrained: from where training started (from_unet of model.pretrained, train.seed).
    drift = evaluate_in_process(sd_args(sd_kit, tmp_path / "drift", "eval.mode=drift"))
    assert drift["pretrained"] == str(sd_kit["pretrained"]) and not drift["not_compared"]
    assert drift["l2_ewc"] == pytest.approx(sd_kit["drift"], rel=1e-9) and sd_kit["drift"] > 0
    assert {"controlnet_cond_embedding", "controlnet_mid_block", "down_blocks.0"} <= set(drift["groups"])


def other_resolution_shards(folder: Path) -> Path:
    """SD shards prepared at 128 px (16x16 latents): they do not fit the 64 px tiny model."""
    sample = {"x": np.zeros((4, 16, 16), np.float32), "tokens": np.zeros(77, np.int32),
              "control": np.zeros((128, 128, 3), np.uint8)}  # fmt: skip
    fields = {"x": "npy", "tokens": "npy", "control": "png"}
    folder.mkdir(parents=True)
    write_manifest(folder, [write_shard(folder / shard_name(0), [sample, sample], fields, 0)], fields)
    return folder


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.data=null"], "eval.data must be set for eval.mode=metrics with model.family=sd_controlnet"),
        (["eval.mode=replacement", "eval.pretrained=x", "eval.data=null"], "eval.data must be set for eval.mode=repl"),
        (["eval.data={tiny_target}"], "lack the field(s) ['tokens', 'control'] that model.family=sd_controlnet"),
        (["eval.data={other}"], "its samples 'x' have shape (4, 16, 16) but the model samples (4, 8, 8)"),
        (["eval.model={root}"], "is neither a ControlNet folder (config.json), a Stable Diffusion folder"),
        (["eval.reference={flat}"], "has no class subfolders: put each class's images in root/<class>/"),
    ],
)
def test_bad_sd_evaluation_inputs_are_named(sd_kit, tiny, tmp_path, overrides, message):
    paths = {"tiny_target": tiny["target"], "root": sd_kit["root"]} | {k: tmp_path / k for k in ("other", "flat")}
    if any("{other}" in o for o in overrides):
        other_resolution_shards(paths["other"])
    if any("{flat}" in o for o in overrides):  # images with no class subfolder: not an ImageFolder
        paths["flat"].mkdir()
        Image.new("RGB", (64, 64)).save(paths["flat"] / "image.png")
    args = sd_args(sd_kit, tmp_path / "eval", *(o.format(**paths) for o in overrides))
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)) as raised:
        evaluate_in_process(args)
    assert any(o.split("=")[0] + "=" in str(raised.value) for o in overrides), "the message names the key"
    assert not (tmp_path / "eval" / "samples").exists()
