"""The glyph experiment: Latin letters (the source) to Greek capitals (the target), where Diff-Tuning's premise can
hold: a source model that draws its own letters well, a target with a new label space that shares their strokes.

This module holds the gates, run before any comparison of methods, on the shipped assets (assets/glyphs, built by
launch/make_glyph_assets.py, which also measures gate 1 into models_info.json):
- gate 1: the source model's samples are their letter for >= 90% of the feature net's calls and within 3x the
  real-vs-real Fréchet floor (`glyphs_assets.sample_gate`);
- gate 2: at low noise (t < 150) the pre-trained model, with the null class, denoises held-out Greek capitals at
  least as well as a fine-tuned model with their own class: what the bank is meant to retain is worth retaining;
- gate 3: handing the last 10% of the sampling steps of an over-fitted fine-tuned model to the pre-trained model
  lowers its Fréchet distance to held-out Greek capitals.
Every job is the project's own (prepare_data, train, evaluate), called in this process as the digits experiment
calls them (trainer/experiments/digits.py), with the configs/glyphs.yaml preset.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from models.feature_net import load_feature_net, nhwc_to_nchw
from trainer.evaluation.evaluate import evaluate
from trainer.experiments import glyphs_data
from trainer.experiments.digits import METHODS, Plan, job_config, prepare, sample_metrics
from trainer.experiments.glyphs_assets import NUM_LATIN, SIZE
from trainer.loop import train

ROOT = Path(__file__).resolve().parents[2]
ASSETS = glyphs_data.ASSETS
LOW_NOISE = 150  # gate 2 compares the bands that end at or below this timestep


def glyph_plan(out: Path, overrides: list[str] | None = None, assets: Path = ASSETS) -> Plan:
    return Plan(
        out=out, sizes=[10], seeds=[0], overrides=list(overrides or []),
        source_model=str(assets / "source_model"), classifier=str(assets / "feature_net.pt"),
        preset=str(ROOT / "configs" / "glyphs.yaml"), class_offset=NUM_LATIN,
    )  # fmt: skip


def run_gates(plan: Plan, steps: int) -> dict:
    """Gates 2 and 3 with one fine-tuned model (`steps` steps on target_train, seed 0); returns them (and writes
    <out>/gates.json) with the numbers they were decided on."""
    started = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    held = prepare(plan, "target_heldout", *glyphs_data.load_glyphs("target_heldout", SIZE))
    train_images, train_labels = glyphs_data.load_glyphs("target_train", SIZE)
    target = prepare(plan, "target_train", train_images, train_labels)
    run_dir = plan.out / "runs" / "gate_finetune"
    overrides = [f"data.target={target}", f"run.dir={run_dir}", "train.seed=0", f"train.steps={steps}"]
    train(job_config(("data.target",), plan, *overrides, *METHODS["finetune"]), resume=False, overwrite=True)
    export = run_dir / "export" / "ema"

    models = f"[pretrained={plan.source_model},finetune={export}]"
    denoising = evaluate(job_config((), plan, "eval.mode=denoising", f"eval.models={models}",
                                    f"eval.reference={held}", f"data.bank={held}", "eval.num_samples=100000",
                                    f"eval.out={plan.out / 'gates' / 'denoising'}"))  # fmt: skip
    bands, errors = denoising["bands"], denoising["errors"]
    low = [k for k, band in enumerate(bands) if int(band.split("-")[1]) <= LOW_NOISE]
    pretrained_null = [errors["pretrained"]["bank"][k] for k in low]  # "bank": the set read with the null class
    finetune_own = [errors["finetune"]["target"][k] for k in low]
    gate2 = {
        "bands": [bands[k] for k in low], "pretrained_null_class": pretrained_null,
        "finetune_own_class": finetune_own, "finetune_null_class": [errors["finetune"]["bank"][k] for k in low],
        "passes": all(p <= f for p, f in zip(pretrained_null, finetune_own)),
        "all_bands": {"bands": bands, "errors": errors},
    }  # fmt: skip

    net = load_feature_net(plan.classifier)
    rows = sample_metrics(plan, str(export), plan.out / "gates" / "replacement", held, net,
                          nhwc_to_nchw(train_images), "eval.mode=replacement",
                          f"eval.pretrained={plan.source_model}")  # fmt: skip
    own, handed = rows["handover_000"], rows["handover_010"]
    gate3 = {"fine_tuned": own, "last_10_percent_pretrained": handed, "passes": handed["fid"] < own["fid"]}
    gates = {
        "finetune_steps": steps, "seed": 0, "gate_2_low_noise_retention": gate2, "gate_3_replacement": gate3,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    (plan.out / "gates.json").write_text(json.dumps(gates, indent=2) + "\n")
    return gates
