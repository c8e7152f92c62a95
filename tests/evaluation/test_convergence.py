"""The sudden-convergence tracker: its metrics by hand, and a tracker fed outputs that do and do not follow the
control (the values, the interval, the first crossing step, a resume)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.shards import shard_name, write_manifest, write_shard
from models.annotators import annotator_for, canny, load_annotator
from tests.tiny_sd import shape_image
from trainer.config import ConfigError, load_config
from trainer.convergence import RESULT_NAME, ConvergenceTracker, control_agreement, crosses
from trainer.metrics import MetricsLogger

DEPTH_ANNOTATOR = "import numpy as np\n\ndef depth(image):\n    return image.mean(axis=-1).astype(np.uint8)\n"


def test_metrics_by_hand():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, :2] = 255  # half the pixels of sample 0 differ by 1.0 in every channel
    np.testing.assert_allclose(control_agreement("mse", a, b).numpy(), [0.5, 0.0])
    np.testing.assert_allclose(control_agreement("pixel_accuracy", a, b).numpy(), [0.5, 1.0])
    b[1, 0, 0, 2] = 7  # one channel off: the pixel's class colour is wrong
    np.testing.assert_allclose(control_agreement("pixel_accuracy", a, b).numpy(), [0.5, 15 / 16])
    assert crosses("mse", 0.03, 0.04) and not crosses("mse", 0.05, 0.04)
    assert crosses("ssim", 0.6, 0.55) and not crosses("ssim", 0.5, 0.55)


def test_ssim_after_blur_forgives_small_shifts():
    edges = canny(shape_image(np.random.default_rng(0)))[None]
    shifted = np.roll(edges, 1, axis=2)
    assert control_agreement("ssim", edges, edges).item() == pytest.approx(1.0, abs=1e-6)
    sharp, blurred = (control_agreement("ssim", shifted, edges, sigma).item() for sigma in (0.0, 2.0))
    assert blurred > sharp + 0.2 and blurred > 0.55  # edges one pixel off still count as following the control


def validation_set(folder, images: np.ndarray, controls: np.ndarray):
    fields = {"x": "npy", "tokens": "npy", "control": "png"}
    samples = [{"x": np.zeros((4, 8, 8), np.float32), "tokens": np.zeros(77, np.int32), "control": c} for c in controls]
    folder.mkdir(parents=True)
    write_manifest(folder, [write_shard(folder / shard_name(0), samples, fields, 0)], fields, {})
    return folder


class FakeFamily:
    """Generates the validation images themselves once `follows` is set (outputs that follow the controls), and
    before that each item gets another item's image (plausible outputs that ignore the control)."""

    sample_shape = (4, 8, 8)

    def __init__(self, images: np.ndarray):
        self.images, self.follows, self.calls = images, False, []

    def denoiser_from_state_dict(self, state):
        return torch.nn.Identity()

    def sample(self, model, tokens, controls, *, num_steps, guidance_scale, noise):
        self.calls.append((len(tokens), num_steps, guidance_scale, noise.shape))
        images = self.images[: len(tokens)] if self.follows else np.roll(self.images[: len(tokens)], 1, axis=0)
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def tracker_for(tmp_path, control: str, images, controls, *overrides, start_step=0):
    shards = tmp_path / "validation"
    if not shards.exists():
        validation_set(shards, images, controls)
    cfg = load_config("tiny_sd_cpu", [f"model.sd_controlnet.control={control}", f"data.target={shards}", "eval.every=2",
                                      "eval.num_controls=3", *overrides])  # fmt: skip
    family = FakeFamily(images)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    tracker = ConvergenceTracker(cfg, family, run_dir, 0, 1, torch.device("cpu"), start_step)
    return tracker, family, run_dir


def run_steps(tracker, family, run_dir, steps, follows_from: int):
    log = MetricsLogger(run_dir, True, 0, 10, progress=False)
    engine = SimpleNamespace(module=torch.nn.Linear(2, 2))
    for step in steps:
        family.follows = step >= follows_from
        seconds = tracker.after_step(step, engine, log)
        assert (seconds > 0) == (step % 2 == 0)
    log.close()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((run_dir / RESULT_NAME).read_text())


def test_canny_tracker_records_the_curve_and_the_first_crossing(tmp_path):
    images = np.stack([shape_image(np.random.default_rng(i)) for i in range(4)])
    controls = np.stack([canny(image) for image in images])
    tracker, family, run_dir = tracker_for(tmp_path, "canny", images, controls)
    lines, result = run_steps(tracker, family, run_dir, range(1, 9), follows_from=6)
    assert [m["step"] for m in lines] == [2, 4, 6, 8]  # every eval.every steps
    values = [m["convergence/ssim"] for m in lines]
    assert values[0] == values[1] < 0.55 and values[2] == values[3] == pytest.approx(1.0, abs=1e-6)
    assert [m["convergence/first_step"] for m in lines] == [None, None, 6, 6]
    assert result["first_step"] == 6 and result["threshold"] == 0.55 and result["metric"] == "ssim"
    assert [h["step"] for h in result["history"]] == [2, 4, 6, 8]
    assert family.calls[0] == (3, 4, 2.0, (3, 4, 8, 8))  # eval.num_controls from the set, tiny preset's steps
    assert (run_dir / "samples" / "convergence_00000006.png").is_file()

    # A resume from the checkpoint of step 5 re-evaluates steps 6 and 8; this time the outputs follow from step 8.
    tracker, family, _ = tracker_for(tmp_path, "canny", images, controls, start_step=5)
    _, result = run_steps(tracker, family, run_dir, range(6, 9), follows_from=8)
    assert [h["step"] for h in result["history"]] == [2, 4, 6, 8] and result["first_step"] == 8


def test_depth_tracker_with_a_user_annotator_lower_is_better(tmp_path):
    (tmp_path / "midas_stub.py").write_text(DEPTH_ANNOTATOR)
    annotator = f"{tmp_path / 'midas_stub.py'}:depth"
    images = np.stack([shape_image(np.random.default_rng(i)) for i in range(3)])
    controls = np.stack([annotator_for("depth", annotator)(image) for image in images])
    tracker, family, run_dir = tracker_for(
        tmp_path, "depth", images, controls, f"model.sd_controlnet.annotator={annotator}"
    )
    lines, result = run_steps(tracker, family, run_dir, range(1, 5), follows_from=4)
    values = [m["convergence/mse"] for m in lines]
    assert values[0] > 0.04 and values[1] == pytest.approx(0.0, abs=1e-5)  # the paper's depth threshold: 0.04
    assert result["first_step"] == 4 and result["lower_is_better"]


def test_non_canny_tracking_needs_an_annotator(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model.sd_controlnet.control=seg has no built-in annotator: set model.sd_controlnet.annotator",
    ):
        tracker_for(tmp_path, "seg", np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_annotator(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="has no function 'annotate'"):
        load_annotator(str(tmp_path / "empty.py"))
