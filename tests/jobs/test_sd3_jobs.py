"""The SD3 and Flux jobs end to end: captioned images prepared into latents and cached prompt embeddings, the bank
of the pre-trained model's own samples (the same on 1 and 2 ranks, each sample a pure function of its index), and
training with Diff-Tuning on flow time that resumes on 2 ranks where 1 rank stopped, as if it had not stopped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

from data.shards import ShardDataset
from models.sd3 import SD3Family, TextCondition
from tests.conftest import assert_ok, copy_as_stopped_after, read_metrics, run_entry, run_here
from tests.core.test_host_reads import quiet_steps
from tests.tiny_sd import no_leaked_shm  # noqa: F401
from tests.tiny_sd3 import MAX_SEQUENCE_LENGTH, tiny_flux, tiny_sd3  # noqa: F401
from trainer.jobs.kinds.shared import sample_start

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_shm")]  # real processes


def job_args(tiny, *overrides):
    return ["--config", "tiny_sd3_cpu", f"model.pretrained={tiny['pretrained']}", *overrides]


def read_all(folder) -> list[dict]:
    dataset = ShardDataset(folder)
    try:
        return [dataset[i] for i in range(len(dataset))]
    finally:
        dataset.close()


@pytest.fixture(scope="module")
def sd3_data(tiny_sd3, tmp_path_factory):  # noqa: F811
    """The target data and a bank, each written by its job on one rank (in this process)."""
    root = tmp_path_factory.mktemp("sd3_data")
    proc = run_here("prepare_data.py", job_args(tiny_sd3, f"prepare.images={tiny_sd3['images']}",
                                                f"data.target={root / 'target'}"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 image-caption samples written" in proc.stdout
    proc = run_here(
        "generate_bank.py", job_args(tiny_sd3, f"data.bank={root / 'bank'}", "bank.prompts=['','a square']")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"target": root / "target", "bank": root / "bank", "root": root}


def test_prepared_shards_hold_latents_and_the_captions_cached_embeddings(sd3_data, tiny_sd3):  # noqa: F811
    samples = read_all(sd3_data["target"])
    index = [json.loads(line) for line in (tiny_sd3["images"] / "index.jsonl").read_text().splitlines()]
    assert [s["meta"]["caption"] for s in samples] == [entry["caption"] for entry in index]
    family = SD3Family.from_pretrained(str(tiny_sd3["pretrained"]), max_sequence_length=MAX_SEQUENCE_LENGTH)
    expected = family.encode_prompts([entry["caption"] for entry in index])
    for k, sample in enumerate(samples):
        assert sample["x"].shape == (4, 8, 8) and sample["x"].dtype == np.float32
        assert sample["prompt_embeds"].shape == (77 + MAX_SEQUENCE_LENGTH, 32)
        assert sample["prompt_embeds"].dtype == np.float16 and sample["pooled_embeds"].shape == (32,)
        # float16 storage (one rounding: 2^-11 relative); the batching of the encoders may move the last bit
        for name, value in (("prompt_embeds", expected.prompt_embeds[k]), ("pooled_embeds", expected.pooled_embeds[k])):
            np.testing.assert_allclose(sample[name].astype(np.float32), value.numpy(), rtol=2e-3, atol=1e-4)


def test_bad_caption_data_is_refused_by_name(tiny_sd3, tmp_path):  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    (images / "index.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x", "control": "a_c.png"}) + "\n")
    proc = run_here("prepare_data.py", job_args(tiny_sd3, f"prepare.images={images}", f"data.target={tmp_path / 't'}"))
    assert proc.returncode == 2 and 'sample a.png has a "control", but model.family=sd3 takes' in proc.stderr
    proc = run_here("prepare_data.py", job_args(tiny_sd3, f"prepare.images={tiny_sd3['images']}",
                                                f"data.target={tmp_path / 't'}", "prepare.hflip=true"))  # fmt: skip
    assert proc.returncode == 2 and "prepare.hflip=true: model.family=sd3 data is not flipped" in proc.stderr


def test_bank_is_the_same_on_two_ranks_and_a_pure_function_of_the_index(sd3_data, tiny_sd3, tmp_path):  # noqa: F811
    """Two ranks each write one of the two shards: the same samples as one rank. Sample i is the pre-trained
    model's Euler chain from (bank.seed, i)'s prompt and noise, stored with that prompt's embeddings."""
    two = tmp_path / "bank2"
    assert_ok(run_entry("generate_bank.py", job_args(tiny_sd3, f"data.bank={two}", "bank.prompts=['','a square']"), 2))
    one, other = read_all(sd3_data["bank"]), read_all(two)
    assert len(one) == len(other) == 6
    for a, b in zip(one, other):
        np.testing.assert_allclose(a["x"], b["x"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a["prompt_embeds"], b["prompt_embeds"])
        assert a["meta"] == b["meta"]
    assert {s["meta"]["prompt"] for s in one} == {"", "a square"}  # both prompts were drawn
    family = SD3Family.from_pretrained(str(tiny_sd3["pretrained"]), max_sequence_length=MAX_SEQUENCE_LENGTH)
    prompts = ["", "a square"]
    for i in (0, 5):
        which, noise = sample_start(0, i, len(prompts), family.sample_shape)
        encoded = family.encode_prompts([prompts[which]])  # as the bank stores and reads them: float16
        condition = TextCondition(encoded.prompt_embeds.half().float(), encoded.pooled_embeds.half().float())
        x = family.sample(None, condition, num_steps=4, noise=noise[None], decode=False)
        np.testing.assert_allclose(one[i]["x"], x[0].numpy(), rtol=1e-4, atol=1e-5)
        assert one[i]["meta"]["prompt"] == prompts[which]


def exported_transformer(run_dir, which: str) -> dict[str, torch.Tensor]:
    return SD3Transformer2DModel.from_pretrained(run_dir / "export" / which / "transformer").state_dict()


def test_training_resumed_on_two_ranks_continues_the_one_rank_run(sd3_data, tiny_sd3, tmp_path):  # noqa: F811
    """Diff-Tuning on SD3 (ZeRO-2): steps 3-4 on 2 ranks resumed from 1 rank's step-2 checkpoint give the losses
    and weights of the 1-rank run (global-batch invariance and exact, elastic resumption); quiet steps read nothing
    from the device; the export loads as a StableDiffusion3Pipeline folder."""
    common = [f"data.target={sd3_data['target']}", f"data.bank={sd3_data['bank']}", "train.zero_stage=2",
              "run.log_every=2", "run.ckpt_every=2"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_entry("train.py", job_args(tiny_sd3, *common, f"run.dir={straight}")))
    copy_as_stopped_after(straight, resumed, 2)
    args = job_args(tiny_sd3, *common, f"run.dir={resumed}", "debug.count_host_reads=true")
    assert_ok(run_entry("train.py", [*args, "--resume"], num_procs=2))
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [2, 4]
    assert np.isfinite(a[-1]["loss/bank"]) and a[-1]["loss/bank"] > 0  # bank slots took part
    np.testing.assert_allclose([m["loss/total"] for m in a], [m["loss/total"] for m in b], rtol=1e-5)
    for which in ("raw", "ema"):
        wa, wb = exported_transformer(straight, which), exported_transformer(resumed, which)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=f"{which}: {key}")
    for rank in range(2):
        steps = quiet_steps(resumed, rank)
        assert [s["step"] for s in steps] == [3] and steps[0]["by_origin"].get("project", 0) == 0
    assert (straight / "export" / "ema" / "model_index.json").is_file()


def test_flux_jobs_prepare_generate_and_train_resumed_on_two_ranks(tiny_flux, tmp_path):  # noqa: F811
    """Flux through the same jobs: prepare and a bank (guidance input 3.5) on one rank, training (LoRA, ZeRO-2)
    resumed on 2 ranks from 1 rank's step-2 checkpoint ends as the 1-rank run; the LoRA file loads in FluxPipeline."""
    args = lambda *more: ["--config", "tiny_flux_cpu", f"model.pretrained={tiny_flux['pretrained']}", *more]  # noqa: E731
    target, bank = tmp_path / "target", tmp_path / "bank"
    for script, more in (("prepare_data.py", [f"prepare.images={tiny_flux['images']}", f"data.target={target}"]),
                         ("generate_bank.py", [f"data.bank={bank}"])):  # fmt: skip
        proc = run_here(script, args(*more))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_all(bank)[0]["x"].shape == read_all(target)[0]["x"].shape == (4, 8, 8)
    common = [f"data.target={target}", f"data.bank={bank}", "train.zero_stage=2", "method.peft=lora", "run.log_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_entry("train.py", args(*common, f"run.dir={straight}")))
    copy_as_stopped_after(straight, resumed, 2)
    assert_ok(run_entry("train.py", [*args(*common, f"run.dir={resumed}"), "--resume"], num_procs=2))
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [2, 4]
    np.testing.assert_allclose([m["loss/total"] for m in a], [m["loss/total"] for m in b], rtol=1e-5)
    lora = [
        load_file(run / "export" / "ema_adapter" / "pytorch_lora_weights.safetensors") for run in (straight, resumed)
    ]
    assert lora[0].keys() == lora[1].keys() and all(k.startswith("transformer.") for k in lora[0])
    for key in lora[0]:
        torch.testing.assert_close(lora[0][key], lora[1][key], rtol=1e-5, atol=1e-6, msg=key)
