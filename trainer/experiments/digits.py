"""The digits experiment: the paper's findings at CPU scale, on a real data set, with the project's own jobs.

A small DiT pre-trained on digits 0-4 (assets/digits) is transferred to digits 5-9 with a new label space and few
images per class, by plain fine-tuning and by Diff-Tuning (the paper's and the released code's settings), for
several seeds and step counts. Every job is the project's (prepare_data, generate_bank, train, evaluate), called
in this process with the configs/digits.yaml preset and key=value overrides, exactly as the entry points call
them (one process saves DeepSpeed's start-up per job). Raw numbers go to `<out>/results.json`; the report
(trainer/experiments/report.py) turns them into docs/results.md and its plots.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from data import digits
from data.formats import open_shard_set
from models.feature_net import frechet_distance, load_feature_net, nhwc_to_nchw
from trainer.config import load_config
from trainer.evaluation.evaluate import evaluate
from trainer.jobs.bank import generate_bank
from trainer.jobs.prepare import prepare_data
from trainer.loop import train

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets" / "digits"
PRESET = str(ROOT / "configs" / "digits.yaml")
# Plain fine-tuning; Diff-Tuning with the paper's settings (r = 1/2, lambda = 1, xi = 1 - psi, tau = 1); and
# with the released code's (6 bank slots of 32 by int(), lambda = 0.1, mirrored power timestep distributions).
METHODS = {
    "finetune": ["method.bank_ratio=0", "method.tau=0"],
    "difftune_paper": ["method.bank_ratio=0.5", "method.bank_loss_weight=1", "method.tau=1",
                       "method.timestep_weights=complement"],
    "difftune_released": ["method.bank_ratio=0.2", "method.bank_count=floor", "method.bank_loss_weight=0.1",
                          "method.tau=1", "method.timestep_weights=mirrored", "method.bank_tau=1"],
}  # fmt: skip


@dataclass
class Plan:
    out: Path
    sizes: list[int] = field(default_factory=lambda: [10, 50])  # target images per class
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seed and the few-shot draw
    steps: list[int] = field(default_factory=lambda: [200, 600])  # cumulative: one run resumed to each count
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    overrides: list[str] = field(default_factory=list)  # key=value for every job (e.g. eval.num_samples=100)
    source_model: str = str(ASSETS / "source_model")
    classifier: str = str(ASSETS / "classifier.pt")
    preset: str = PRESET
    class_offset: int = digits.TARGET_DIGITS[0]  # the classifier's id of target class 0


def job_config(keys: tuple[str, ...], plan: Plan, *overrides: str):
    return load_config(plan.preset, [f"model.pretrained={plan.source_model}", *plan.overrides, *overrides], keys)


def prepare(plan: Plan, name: str, images: np.ndarray, labels: np.ndarray) -> str:
    """Writes an ImageFolder and runs the prepare job on it; returns the shard directory."""
    folder = digits.write_image_folder(images, labels, plan.out / "images" / name)
    shards = plan.out / "shards" / name
    prepare_data(job_config((), plan, f"prepare.images={folder}", f"data.target={shards}"))
    return str(shards)


def samples_of(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 NCHW images, class ids) of an evaluation sample set (sample i has class i mod K)."""
    dataset = open_shard_set(str(folder), verify="size")
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.from_numpy(np.stack([item["image"] for item in items])).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([int(item["label"]) for item in items])


@torch.no_grad()
def sample_scores(
    net, images: torch.Tensor, classes: torch.Tensor, train_images: torch.Tensor, class_offset: int
) -> dict:
    """The classifier's accuracy on samples of target class k (its class `class_offset` + k: digit 5 + k), and the
    mean distance from each sample to its nearest training image (pixels in [0, 1], RMS): small values mean copies
    of the few images."""
    logits, _ = net.heads(images)
    accuracy = float((logits.argmax(1) == classes + class_offset).float().mean())
    a, b = images.flatten(1).float() / 255, train_images.flatten(1).float() / 255
    nearest = torch.cdist(a, b).min(1).values / a.shape[1] ** 0.5
    return {"accuracy": accuracy, "nn_distance": float(nearest.mean())}


def sample_metrics(plan: Plan, model: str, out: Path, reference: str, net, train_images, *extra: str) -> dict:
    """The evaluation job's metrics (and, with eval.mode=replacement, per hand-over share) plus accuracy."""
    results = evaluate(job_config((), plan, f"eval.model={model}", f"eval.reference={reference}",
                                  f"eval.out={out}", f"eval.feature_net={plan.classifier}",
                                  f"eval.cache={plan.out / 'eval_cache'}", *extra))  # fmt: skip
    rows = {}
    for name, row in results["results"].items():
        images, classes = samples_of(out / name)
        rows[name] = {**{k: row[k] for k in ("handover", "fid", "kid", "precision", "recall")},
                      **sample_scores(net, images, classes, train_images, plan.class_offset)}  # fmt: skip
    return rows


def run_experiment(plan: Plan) -> dict:
    """Runs every job of the plan into plan.out and returns (and writes) the raw results."""
    started, seconds = time.perf_counter(), {}
    torch.manual_seed(0)
    plan.out.mkdir(parents=True, exist_ok=True)
    net = load_feature_net(plan.classifier)

    def lap(name: str, begin: float) -> None:
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - begin, 1)

    t = time.perf_counter()
    held_target = prepare(plan, "heldout_target", *digits.split(digits.TARGET_DIGITS, "heldout"))
    held_source = prepare(plan, "heldout_source", *digits.split(digits.SOURCE_DIGITS, "heldout"))
    targets = {(n, s): prepare(plan, f"target_{n}_seed{s}", *digits.few_shot(digits.TARGET_DIGITS, n, s))
               for n in plan.sizes for s in plan.seeds}  # fmt: skip
    lap("prepare", t)
    t = time.perf_counter()
    bank = str(plan.out / "shards" / "bank")
    generate_bank(job_config((), plan, f"data.bank={bank}"))
    lap("bank", t)

    real_target = nhwc_to_nchw(digits.split(digits.TARGET_DIGITS, "heldout")[0])
    records: list[dict] = []
    t = time.perf_counter()
    pre = sample_metrics(
        plan,
        plan.source_model,
        plan.out / "eval" / "pretrained",
        held_target,
        net,
        nhwc_to_nchw(digits.few_shot(digits.TARGET_DIGITS, 1, 0)[0]),
        "eval.num_classes=5",
    )
    lap("evaluate", t)
    floors = {}
    for (n, s), shards in targets.items():
        train_images = nhwc_to_nchw(digits.few_shot(digits.TARGET_DIGITS, n, s)[0])
        floors[f"{n}_seed{s}"] = frechet_distance(net, real_target, train_images)
        for method in plan.methods:
            run_dir = plan.out / "runs" / f"n{n}_seed{s}" / method
            for i, steps in enumerate(plan.steps):
                t = time.perf_counter()
                overrides = [f"data.target={shards}", f"data.bank={bank}", f"run.dir={run_dir}",
                             f"train.seed={s}", f"train.steps={steps}", *METHODS[method]]  # fmt: skip
                train(job_config(("data.target",), plan, *overrides), resume=i > 0, overwrite=i == 0)
                export = plan.out / "exports" / f"n{n}_seed{s}_{method}_{steps}"
                shutil.rmtree(export, ignore_errors=True)
                shutil.copytree(run_dir / "export" / "ema", export)
                lap("train", t)
                t = time.perf_counter()
                evaluation = plan.out / "eval" / export.name
                row = sample_metrics(plan, str(export), evaluation, held_target, net, train_images)["samples"]
                records.append({"size": n, "seed": s, "method": method, "steps": steps, "export": str(export),
                                "grid": str(evaluation / "grid_samples.png"), **row})  # fmt: skip
                lap("evaluate", t)
    t = time.perf_counter()
    replacement, denoising = [], []
    last = plan.steps[-1]
    for n in plan.sizes:
        for s in plan.seeds:
            train_images = nhwc_to_nchw(digits.few_shot(digits.TARGET_DIGITS, n, s)[0])
            exports = {m: str(plan.out / "exports" / f"n{n}_seed{s}_{m}_{last}") for m in plan.methods}
            for method, export in exports.items():
                rows = sample_metrics(plan, export, plan.out / "replacement" / Path(export).name, held_target, net,
                                      train_images, "eval.mode=replacement",
                                      f"eval.pretrained={plan.source_model}")  # fmt: skip
                replacement.append({"size": n, "seed": s, "method": method, "steps": last,
                                    "curve": list(rows.values())})  # fmt: skip
            models = [f"pretrained={plan.source_model}", *(f"{m}={e}" for m, e in exports.items())]
            result = evaluate(job_config((), plan, "eval.mode=denoising", f"eval.models=[{','.join(models)}]",
                                         f"eval.reference={held_target}", f"data.bank={held_source}",
                                         "eval.num_samples=100000",
                                         f"eval.out={plan.out / 'denoising' / f'n{n}_seed{s}'}"))  # fmt: skip
            denoising.append({"size": n, "seed": s, "steps": last, "bands": result["bands"],
                              "errors": result["errors"]})  # fmt: skip
    lap("analyses", t)
    seconds["total"] = round(time.perf_counter() - started, 1)
    results = {
        "plan": {**asdict(plan), "out": str(plan.out), "methods": {m: METHODS[m] for m in plan.methods}},
        "heldout": {"target": len(real_target), "source": len(digits.split(digits.SOURCE_DIGITS, "heldout")[0])},
        "pretrained": pre["samples"],
        "train_images_fid": floors,
        "runs": records,
        "replacement": replacement,
        "denoising": denoising,
        "seconds": seconds,
    }
    (plan.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def merge_results(parts: list[dict], plan: Plan) -> dict:
    """One results dict from the parts of a plan split by size (run in parallel, each in its own folder)."""
    merged = {**parts[0], "plan": {**parts[0]["plan"], "out": str(plan.out), "sizes": list(plan.sizes)}}
    for key in ("runs", "replacement", "denoising"):
        merged[key] = [entry for part in parts for entry in part[key]]
    merged["train_images_fid"] = {k: v for part in parts for k, v in part["train_images_fid"].items()}
    merged["seconds"] = {f"part {i} {k}": v for i, part in enumerate(parts) for k, v in part["seconds"].items()}
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
    return merged
