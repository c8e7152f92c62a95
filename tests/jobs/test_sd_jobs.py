"""The prepare and bank jobs for SD 1.5 + ControlNet: image-caption-control triples into shards, the bank of SD's
own samples with annotated controls, bad inputs named, and a training run on what they wrote."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import load_image_and_control
from data.shards import MANIFEST_NAME, ShardDataset, shard_name
from models.annotators import annotate_batch, canny, to_uint8
from models.sd_controlnet import SDControlNetFamily
from tests.conftest import assert_ok, read_metrics, run_entry, run_here
from tests.tiny_sd import make_caption_folder, no_leaked_shm, shape_image, tiny_sd  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_shm")]  # real processes

SEG_ANNOTATOR = "import numpy as np\n\ndef segment(image):\n    return (image // 128 * 255).astype(np.uint8)\n"


def prepare_args(tiny, images, out, *overrides):
    return ["--config", "tiny_sd_cpu", f"model.pretrained={tiny['pretrained']}", f"prepare.images={images}",
            f"data.target={out}", *overrides]  # fmt: skip


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """5 shape images: 0-2 annotated by Canny in the job, 3-4 with given controls (one a non-square image with an
    L-mode map), and one unreadable image."""
    root = make_caption_folder(tmp_path_factory.mktemp("captions"), 5)
    rng = np.random.default_rng(9)
    lines = (root / "index.jsonl").read_text().splitlines()[:3]
    for i in (3, 4):
        image = shape_image(rng, 64) if i == 3 else np.concatenate([shape_image(rng, 64), shape_image(rng, 64)], 1)
        Image.fromarray(image).save(root / f"given{i}.png")
        Image.fromarray(canny(image)[..., 0]).save(root / f"given{i}_edges.png")
        lines.append(
            json.dumps({"image": f"given{i}.png", "caption": "a red circle", "control": f"given{i}_edges.png"})
        )
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    lines.insert(1, json.dumps({"image": "broken.png", "caption": "lost"}))
    (root / "index.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(tiny_sd, captions, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("prepared") / "target"
    proc = run_entry("prepare_data.py", prepare_args(tiny_sd, captions, out))
    assert_ok(proc)
    assert "5 image-caption-control samples written" in proc.stdout and "1 unreadable" in proc.stdout
    return out


def test_prepared_shards_hold_latents_tokens_and_controls(prepared, captions, tiny_sd):  # noqa: F811
    dataset = ShardDataset(prepared)
    assert set(dataset.manifest.fields) == {"x", "tokens", "control", "meta"}  # no flipped views
    family = SDControlNetFamily.from_pretrained(str(tiny_sd["pretrained"]))
    entries = [json.loads(line) for line in (captions / "index.jsonl").read_text().splitlines()]
    entries = [e for e in entries if e["image"] != "broken.png"]
    for i, entry in enumerate(entries):
        sample = dataset[i]
        assert sample["meta"] == {"index": i, "image": entry["image"], "caption": entry["caption"]}
        assert sample["x"].shape == (4, 8, 8) and sample["tokens"].dtype == np.int32
        np.testing.assert_array_equal(sample["tokens"], family.tokenize([entry["caption"]])[0].numpy())
        control = entry.get("control") and captions / entry["control"]
        image, given = load_image_and_control(captions / entry["image"], control, 64, nearest=False)
        want = canny(image) if given is None else np.repeat(given[..., None], 3, axis=-1)
        np.testing.assert_array_equal(sample["control"], want)
    report = json.loads((prepared / "report.json").read_text())
    assert report["num_images"] == 5 and report["num_annotated"] == 3
    assert [item["path"] for item in report["unreadable"]] == ["broken.png"]


def test_two_processes_prepare_the_same_shards(prepared, captions, tiny_sd, tmp_path):  # noqa: F811
    out = tmp_path / "target"
    assert_ok(run_entry("prepare_data.py", prepare_args(tiny_sd, captions, out), num_procs=2))
    for name in [shard_name(0), shard_name(1), MANIFEST_NAME, "job.json"]:
        assert (out / name).read_bytes() == (prepared / name).read_bytes(), name


@pytest.mark.parametrize("problem", ["size", "channels", "hflip", "no_annotator"])
def test_bad_controls_are_named_before_any_work(captions, tiny_sd, tmp_path, problem):  # noqa: F811
    root = tmp_path / "captions"
    shutil.copytree(captions, root)
    overrides = []
    if problem in ("size", "channels"):
        control = Image.open(root / "given3_edges.png")
        (control.resize((60, 64)) if problem == "size" else control.convert("RGBA")).save(root / "given3_edges.png")
    elif problem == "hflip":
        overrides = ["prepare.hflip=true"]
    else:
        overrides = ["model.sd_controlnet.control=depth"]
    proc = run_here("prepare_data.py", prepare_args(tiny_sd, root, tmp_path / "out", *overrides))
    assert proc.returncode == 2, proc.stderr
    expected = {
        "size": "sample given3.png (1 misfit in all): its control map is 60x64 but the image is 64x64",
        "channels": "sample given3.png (1 misfit in all): its control map has mode RGBA (4 channels)",
        "hflip": "prepare.hflip=true: ControlNet data is not flipped",
        "no_annotator": (
            "sample 0.png (4 in all) has no control map and model.sd_controlnet.control=depth has no built-in annotator"
        ),
    }[problem]
    assert expected in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written, so a fixed input reruns cleanly


def test_segmentation_maps_from_a_user_annotator(tiny_sd, tmp_path):  # noqa: F811
    root = make_caption_folder(tmp_path / "captions", 3)
    (tmp_path / "segmenter.py").write_text(SEG_ANNOTATOR)
    args = ["model.sd_controlnet.control=seg", f"model.sd_controlnet.annotator={tmp_path / 'segmenter.py'}:segment"]
    assert_ok(run_entry("prepare_data.py", prepare_args(tiny_sd, root, tmp_path / "out", *args)))
    sample = ShardDataset(tmp_path / "out")[1]
    image, _ = load_image_and_control(root / "1.png", None, 64, nearest=True)
    np.testing.assert_array_equal(sample["control"], image // 128 * 255)


# --- the bank -------------------------------------------------------------------------------------------------------
def bank_args(tiny, out, *overrides):
    return ["--config", "tiny_sd_cpu", f"model.pretrained={tiny['pretrained']}", f"data.bank={out}", *overrides]


@pytest.fixture(scope="module")
def bank(tiny_sd, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("bank") / "bank"
    proc = run_entry("generate_bank.py", bank_args(tiny_sd, out))
    assert_ok(proc)
    assert "bank: 6 samples generated (0 already complete)" in proc.stdout
    return out


def test_bank_holds_sd_samples_with_annotated_controls(bank, tiny_sd):  # noqa: F811
    dataset = ShardDataset(bank)
    meta = dataset.manifest.meta
    assert meta["control"] == "canny" and meta["prompts"] == ["a high-quality, detailed, and professional image"]
    family = SDControlNetFamily.from_pretrained(str(tiny_sd["pretrained"]))
    x = torch.from_numpy(np.stack([dataset[i]["x"] for i in range(len(dataset))]))
    with torch.no_grad():
        controls = annotate_batch(canny, to_uint8(family.decode(x)))
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["meta"] == {"index": i, "seed": 0, "prompt": meta["prompts"][0]}
        np.testing.assert_array_equal(sample["tokens"], family.null_tokens.numpy())  # the null condition
        assert (sample["control"] == controls[i]).mean() > 0.99  # re-decoded here: other thread counts, same edges
        assert sample["control"].shape == (64, 64, 3) and sample["control"].any()
    assert (bank / "preview.png").is_file()


def test_two_processes_generate_the_same_bank(bank, tiny_sd, tmp_path):  # noqa: F811
    assert_ok(run_entry("generate_bank.py", bank_args(tiny_sd, tmp_path / "bank"), num_procs=2))
    for name in [shard_name(0), shard_name(1), MANIFEST_NAME, "job.json"]:
        assert (tmp_path / "bank" / name).read_bytes() == (bank / name).read_bytes(), name


def test_training_on_the_jobs_outputs_tracks_convergence(prepared, bank, tiny_sd, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = ["--config", "tiny_sd_cpu", f"model.pretrained={tiny_sd['pretrained']}", f"data.target={prepared}",
            f"data.bank={bank}", f"eval.data={prepared}", f"run.dir={run}", "train.steps=2",
            "eval.every=1"]  # fmt: skip
    assert_ok(run_entry("train.py", args))
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if "convergence/ssim" in m] == [1, 2]
    assert all(m["loss/bank"] > 0 and m["loss/target"] > 0 for m in metrics if "loss/total" in m)
    result = json.loads((run / "convergence.json").read_text())
    assert [h["step"] for h in result["history"]] == [1, 2] and result["threshold"] == 0.55
