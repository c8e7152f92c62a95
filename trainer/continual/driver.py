"""Continual multi-stage transfer (launch/continual.py): for each stage, compose the bank (the new part generated on
every rank from the previous stage's weights) -> train from the previous stage, its EMA carried on -> export ->
evaluate on the accumulated held-out data of stages 1..k -> one row of run_dir/results.json.

One run directory holds every stage (run_dir/stage_01, ...). A finished stage is marked done (atomically) and
never redone; a killed bank generation or training resumes as those jobs do (skipping complete shards, from the
latest checkpoint). Each stage starts a fresh optimizer (AdamW moments are not carried over); weights and EMA are.
The class table grows across stages: the union of the stages' class names, in order of first appearance, so an
id never changes; the null row stays the null row (model.class_init=grow).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from data.composed import Part, keep_subset, resolve_parts, write_composed
from data.files import atomic_write_bytes
from data.formats import open_shard_set
from data.images import list_image_folder
from models.dit import ORIGINAL_FREQUENCIES_KEY, DiTFamily
from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.continual.stages import StageConfig, StagesFile, fingerprint, stage_config, to_yaml
from trainer.evaluation.evaluate import evaluate
from trainer.jobs.bank import generate_bank
from trainer.jobs.prepare import prepare_data
from trainer.loop import train

DONE, TABLE, RECORD = "done.json", "results.json", "stages.yaml"
PREPARED = "target_prepared"  # run_dir/stage_NN/target_prepared: the shards of a stage given as images


def run_continual(stages: StagesFile, *, allow_stages_change: bool = False, until_stage: int = 0) -> Path:
    """Runs (or continues) the stages of `stages` in stages.run_dir, up to stage `until_stage` (1-based; 0: all:
    one SLURM job per stage); returns the run directory."""
    rank, world, device = distributed.init()
    run_dir = Path(stages.run_dir)
    check_run_in_progress(run_dir, stages, allow_stages_change)  # every rank reads the same files: all stop alike
    distributed.barrier()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / RECORD, to_yaml(stages).encode())
        atomic_write_bytes(run_dir / f"{RECORD}.sha256", fingerprint(stages).encode())
    distributed.barrier()
    classes: list[str] = []
    previous: Path | None = None
    for number, stage in enumerate(stages.stages[: until_stage or None]):
        folder = run_dir / f"stage_{number + 1:02d}"
        for name in stage_classes(stage):
            if name not in classes:
                classes.append(name)  # a new class gets the next id; earlier ids never move
        if not (folder / DONE).is_file():
            run_stage(stages, number, folder, previous, list(classes), rank)
        previous = folder
    if rank == 0:
        print(format_table(read_table(run_dir)), flush=True)
    return run_dir


def check_run_in_progress(run_dir: Path, stages: StagesFile, allow_change: bool) -> None:
    recorded = run_dir / f"{RECORD}.sha256"
    if recorded.is_file() and recorded.read_text().strip() != fingerprint(stages) and not allow_change:
        raise ConfigError(
            f"the stages file differs from the one {run_dir} was started with ({run_dir / RECORD}): the finished "
            "stages would not be the stages of this file. Restore it, use a new run_dir, or pass "
            "--allow-stages-change to continue with the new one on purpose"
        )


def run_stage(
    stages: StagesFile, number: int, folder: Path, previous: Path | None, classes: list[str], rank: int
) -> None:
    stage, k = stages.stages[number], number + 1
    base = stage_config(stages, number, [])
    if stage.images:  # prepared with the initial model's VAE, on every rank; a rerun builds only missing shards
        extra = [f"prepare.images={stage.images}", f"model.pretrained={stages.pretrained}",
                 f"data.target={stage_target(stages, number)}"]  # fmt: skip
        prepare_data(stage_config(stages, number, extra))
    if rank == 0:  # the stage's target (and replayed earlier targets), class ids mapped onto the run's table
        write_composed(
            folder / "target", stage_target_parts(stages, number, classes), open_shard_set, {"classes": classes}
        )
    distributed.barrier()
    bank = stage_bank(stages, number, folder, previous, base, rank)
    overrides = [
        f"data.target={folder / 'target'}", f"run.dir={folder / 'train'}", f"train.steps={stage.steps}",
        f"model.num_classes={len(classes)}", "run.export=true",
    ]  # fmt: skip
    overrides += [f"data.bank={bank}"] if bank else ["method.bank_ratio=0", "method.tau=0"]
    if previous is not None:  # the trainer's own previous stage (not the padded export), its EMA carried on
        overrides += [f"model.pretrained={previous / 'model' / 'raw'}", f"model.ema_from={previous / 'model' / 'ema'}",
                      "model.class_init=grow", *_vae(stages, base)]  # fmt: skip
    else:
        overrides += [f"model.pretrained={stages.pretrained}"]
    cfg = stage_config(stages, number, overrides)
    train(cfg, resume=True)  # resume=True: continues a killed training, starts a fresh one
    if rank == 0:
        save_stage_model(folder / "train" / "export", len(classes), folder / "model")
    distributed.barrier()
    row = {"stage": k, "name": stage.name or f"stage_{k:02d}", "mode": stages.mode, "num_classes": len(classes),
           "steps": stage.steps, "bank": bank_summary(bank)}  # fmt: skip
    row.update(evaluate_stage(stages, number, folder, classes, cfg, rank))
    if rank == 0:
        rows = [r for r in read_table(folder.parent) if r["stage"] != k] + [row]
        write_json(folder.parent / TABLE, {"mode": stages.mode, "rows": sorted(rows, key=lambda r: r["stage"])})
        write_json(folder / DONE, row)  # last: the stage is never redone
    distributed.barrier()


def stage_bank(
    stages: StagesFile, number: int, folder: Path, previous: Path | None, base: Config, rank: int
) -> Path | None:
    """The bank stage `number` trains with: none (finetune), stage 1's bank (fixed), or a composition of a kept
    share of the previous bank and samples generated anew (evolving)."""
    policy, k = stages.bank, number + 1
    if stages.mode == "finetune":
        return None
    if stages.mode == "fixed" and previous is not None:
        return folder.parent / "stage_01" / "bank"
    kept: list[Part] = []
    num_new = policy.size
    if previous is not None:
        num_kept = round(policy.size * policy.keep)
        indices = keep_subset(len_of(previous / "bank"), num_kept, (policy.seed, k))
        kept, num_new = resolve_parts(previous / "bank", indices), policy.size - num_kept
    new: list[Part] = []
    if num_new:
        from_initial = previous is None or policy.refresh_from == "initial"
        model = Path(stages.pretrained) if from_initial else previous / "model" / "ema"
        seed = policy.seed + k
        extra = [f"model.pretrained={model}", f"data.bank={folder / 'bank_new'}", f"bank.num_samples={num_new}",
                 f"bank.seed={seed}", "model.num_classes=0", *([] if from_initial else _vae(stages, base))]  # fmt: skip
        generate_bank(stage_config(stages, number, extra))  # every rank; a rerun builds only missing shards
        generator = json.loads((folder / "bank_new" / "manifest.json").read_text())["meta"]["generator"]
        lineage = {"model": str(model.resolve()), "model_stage": 0 if from_initial else k - 1, "bank_stage": k,
                   "seed": seed, "weights_sha256": generator["weights_sha256"]}  # fmt: skip
        new = [Part(str(folder / "bank_new"), list(range(num_new)), lineage)]
    if rank == 0:
        meta = {"kind": "bank", "stage": k, "num_kept": policy.size - num_new, "num_new": num_new,
                "keep_seed": [policy.seed, k], "kept_from": str(previous / "bank") if previous else None}  # fmt: skip
        write_composed(folder / "bank", kept + new, open_shard_set, meta)
    distributed.barrier()
    return folder / "bank"


def stage_target_parts(stages: StagesFile, number: int, classes: list[str]) -> list[Part]:
    """Stage `number`'s target and, with `replay` > 0, a seeded share of every earlier stage's target."""
    k = number + 1
    parts = [labelled_part(stage_target(stages, number), classes, {"stage": k})]
    for earlier in range(number if stages.replay else 0):
        size = len_of(Path(stage_target(stages, earlier)))
        kept = keep_subset(size, round(size * stages.replay), (stages.bank.seed, k, earlier + 1))
        if kept:
            lineage = {"stage": earlier + 1, "replayed_in": k}
            parts.append(labelled_part(stage_target(stages, earlier), classes, lineage, kept))
    return parts


def labelled_part(directory: str, classes: list[str], lineage: dict, indices: list[int] | None = None) -> Part:
    """Samples `indices` (all when None) of a shard set, its class ids mapped onto `classes` by name."""
    dataset = open_shard_set(directory, verify="size")
    try:
        names, size = dataset.manifest.meta["classes"], len(dataset)
    finally:
        dataset.close()
    chosen = list(range(size)) if indices is None else indices
    return Part(str(Path(directory).resolve()), chosen, lineage, [classes.index(n) for n in names])


def evaluate_stage(stages: StagesFile, number: int, folder: Path, classes: list[str], cfg: Config, rank: int) -> dict:
    """Metrics of the stage's EMA on the held-out data of stages 1..k, composed into one reference set."""
    sets = [(k + 1, s.eval_data) for k, s in enumerate(stages.stages[: number + 1]) if s.eval_data]
    if not sets:
        return {}
    if rank == 0:
        parts = [labelled_part(path, classes, {"stage": k}) for k, path in sets]
        write_composed(folder / "eval_data", parts, open_shard_set, {"classes": classes})
    distributed.barrier()
    extra = [f"eval.model={folder / 'train'}", f"eval.reference={folder / 'eval_data'}",
             f"eval.out={folder / 'eval'}", f"eval.cache={folder.parent / 'eval_cache'}", "eval.mode=metrics",
             f"eval.num_classes={len(classes)}"]  # fmt: skip
    results = evaluate(stage_config(stages, number, extra))
    samples = results["results"].get("samples", {}) if rank == 0 else {}
    return {"num_eval_images": results["num_reference"], **{key: samples[key] for key in samples if key != "handover"}}


def save_stage_model(export: Path, num_classes: int, out: Path) -> None:
    """The stage's raw and EMA weights as transformer + scheduler folders with the trained label table (K rows
    and the null row), not DiTPipeline's padding to 1000 rows: the next stage loads these and grows them."""
    for which in ("raw", "ema"):
        target = out / which
        if target.is_dir():
            continue
        family = DiTFamily.from_pretrained(str(export / which), num_classes=num_classes, class_init="reuse")
        plain = DiTTransformer2DModel.from_config(family.transformer.config)  # per-block embedder copies, as saved
        plain.load_state_dict(family.transformer.state_dict())
        tmp = out / f".{which}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp / "transformer")
        if family.original_timestep_frequencies:
            config_path = tmp / "transformer" / "config.json"
            config_path.write_text(json.dumps({**json.loads(config_path.read_text()), ORIGINAL_FREQUENCIES_KEY: True}))
        family.sampling_scheduler().save_pretrained(tmp / "scheduler")
        os.replace(tmp, target)


def _vae(stages: StagesFile, base: Config) -> list[str]:
    """A stage model folder holds no VAE: later stages take the initial model's (or model.dit.vae)."""
    vae = base.model.dit.vae or (
        Path(stages.pretrained) / "vae" if (Path(stages.pretrained) / "vae").is_dir() else None
    )
    return [f"model.dit.vae={vae}"] if vae else []


def stage_target(stages: StagesFile, number: int) -> str:
    """The shard directory of stage `number`'s target: its `target`, or where the driver prepares its `images`."""
    stage = stages.stages[number]
    return stage.target or str(Path(stages.run_dir) / f"stage_{number + 1:02d}" / PREPARED)


def stage_classes(stage: StageConfig) -> list[str]:
    """A stage's class names: its shards' manifest, or its ImageFolder's subfolders (as the prepare job names them)."""
    return list_image_folder(stage.images).classes if stage.images else class_names(stage.target)


def class_names(directory: str) -> list[str]:
    dataset = open_shard_set(directory, verify="none")  # checked by load_stages
    try:
        return list(dataset.manifest.meta["classes"])
    finally:
        dataset.close()


def len_of(directory: Path) -> int:
    dataset = open_shard_set(directory, verify="none")
    try:
        return len(dataset)
    finally:
        dataset.close()


def bank_summary(bank: Path | None) -> dict:
    if bank is None:
        return {}
    meta = json.loads((bank / "manifest.json").read_text())["meta"]
    return {key: meta[key] for key in ("stage", "num_kept", "num_new")}


def read_table(run_dir: Path) -> list[dict]:
    path = run_dir / TABLE
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def write_json(path: Path, document: dict) -> None:
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


def format_table(rows: list[dict]) -> str:
    metrics = [m for m in ("fid", "kid", "precision", "recall") if any(m in row for row in rows)]
    header = f"{'stage':12}{'mode':10}{'classes':>8}{'bank of':>8}{'kept':>6}{'new':>6}"
    lines = [header + "".join(f"{m:>11}" for m in metrics)]
    for row in rows:
        bank = row.get("bank") or {}
        of, kept, new = bank.get("stage", "-"), bank.get("num_kept", "-"), bank.get("num_new", "-")
        scores = "".join(f"{row.get(m, float('nan')):>11.4g}" for m in metrics)
        lines.append(f"{row['name']:12}{row['mode']:10}{row['num_classes']:>8}{of:>8}{kept:>6}{new:>6}" + scores)
    return "\n".join(lines)


def sample_class(model_folder: Path, label: int, num_steps: int = 5) -> torch.Tensor:
    """One sample of class `label` from a stage model folder (a check that earlier classes still sample)."""
    family = DiTFamily.from_pretrained(str(model_folder))
    return family.sample(family.denoiser, torch.tensor([label]), num_steps=num_steps, guidance_scale=1.5,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
