"""The digits experiment end to end at a toy size: every job runs, results.json and docs/results.md come out whole,
and the replacement curve at p = 0 is the fine-tuned model's own samples (same FID as its metrics run)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn", reason="the digits experiment needs the `experiments` extra (scikit-learn)")

from launch.experiment_digits import main  # noqa: E402
from trainer.experiments.digits import ASSETS  # noqa: E402

TOY = [
    "bank.num_samples=16", "bank.samples_per_shard=16", "eval.num_samples=120", "eval.sample_steps=2",
    "eval.kid_subsets=2", "eval.kid_subset_size=50", "eval.handover=[0,1]", "eval.bands=[0,500,1000]",
    "eval.grid_images=0", "train.global_batch_size=8", "train.micro_batch_size=8",
]  # fmt: skip


def test_digits_experiment_end_to_end(tmp_path):
    assert (ASSETS / "source_model").is_dir() and (ASSETS / "classifier.pt").is_file()
    docs = tmp_path / "docs"
    main(["--out", str(tmp_path / "out"), "--docs", str(docs), "--sizes", "3", "--seeds", "0", "--steps", "2", "4",
          "--methods", "finetune", "difftune_paper", "--overrides", *TOY])  # fmt: skip
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = results["runs"]
    assert {(r["method"], r["steps"]) for r in runs} == {(m, s) for m in ("finetune", "difftune_paper") for s in (2, 4)}
    for run in runs:
        assert math.isfinite(run["fid"]) and 0.0 <= run["accuracy"] <= 1.0 and run["nn_distance"] >= 0.0
    assert len(results["replacement"]) == 2
    for entry in results["replacement"]:
        assert [row["handover"] for row in entry["curve"]] == [0.0, 1.0]
        own = next(r for r in runs if (r["method"], r["steps"]) == (entry["method"], 4))
        assert entry["curve"][0]["fid"] == pytest.approx(own["fid"], rel=1e-6)
    (denoising,) = results["denoising"]
    assert denoising["bands"] == ["t 0-500", "t 500-1000"]
    assert set(denoising["errors"]) == {"pretrained", "finetune", "difftune_paper"}
    assert all(len(errors) == 2 for model in denoising["errors"].values() for errors in model.values())
    report = (docs / "results.md").read_text()
    for heading in ("## Samples against held-out digits 5-9", "## The replacement curve", "## Denoising error"):
        assert heading in report
    assert "| 3 | 4 | difftune_paper |" in report
    for plot in ("digits_fid_by_steps.png", "digits_replacement.png", "digits_denoising.png"):
        assert (docs / plot).stat().st_size > 1000
