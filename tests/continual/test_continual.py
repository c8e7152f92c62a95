"""Continual multi-stage transfer: composed banks, the stages file, and the driver run as users run it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.batch import load_micro_batch
from data.composed import Part, keep_subset, read_composed, resolve_parts, write_composed
from data.formats import open_shard_set
from data.sampler import BANK, TARGET, GlobalBatchPlanner, TimestepSplit, slot_ids
from data.shard_jobs import is_complete
from data.shards import ShardError, read_manifest, shard_name, write_manifest, write_shard
from models.dit import DiTFamily
from models.feature_net import FeatureNet, save_feature_net
from tests.conftest import assert_ok, run_entry
from tests.tiny import make_shards
from trainer.config import ConfigError
from trainer.continual.driver import check_run_in_progress, sample_class, stage_target_parts
from trainer.continual.stages import fingerprint, load_stages
from trainer.metrics import MetricsLogger

slow = pytest.mark.slow  # launched multi-stage runs


def image_folder(folder: Path, names: list[str], per_class: int, seed: int) -> Path:
    """An ImageFolder of random 8x8 RGB PNGs, one subfolder per class (a stage given as images)."""
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name / f"{i:03d}.png")
    return folder


def named_shards(folder: Path, num_samples: int, names: list[str], seed: int, per_shard: int = 8) -> Path:
    """Random 3x8x8 samples whose classes are `names` (a stage's data: its own ids 0..len-1)."""
    rng = np.random.default_rng(seed)
    fields, records = {"x": "npy", "label": "cls"}, []
    folder.mkdir(parents=True, exist_ok=True)
    for shard, first in enumerate(range(0, num_samples, per_shard)):
        samples = [
            {"x": rng.standard_normal((3, 8, 8)).astype(np.float32).clip(-1, 1), "label": int(rng.integers(len(names)))}
            for _ in range(first, min(first + per_shard, num_samples))
        ]
        records.append(write_shard(folder / shard_name(shard), samples, fields, first))
    write_manifest(folder, records, fields, {"classes": names})
    return folder


# --- composed banks -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def banks(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("banks")
    return {
        "old": make_shards(root / "old", 64, num_classes=10, per_shard=16, seed=3),
        "new": make_shards(root / "new", 26, num_classes=10, per_shard=10, seed=4),
        "root": root,
    }


def test_composed_bank_is_exact_reproducible_and_serves_the_parts_samples(banks):
    kept = keep_subset(64, round(64 * 0.6), (0, 2))
    assert len(kept) == 38 == len(set(kept)) and kept == sorted(kept) and kept == keep_subset(64, 38, (0, 2))
    assert kept != keep_subset(64, 38, (1, 2))
    lineage = {"model": "stage_01/model/ema", "model_stage": 1, "bank_stage": 2}
    parts = resolve_parts(banks["old"], kept, {"model": "initial", "model_stage": 0}) + [
        Part(str(banks["new"]), list(range(26)), lineage)
    ]
    write_composed(banks["root"] / "bank2", parts, open_shard_set, {"stage": 2})
    bank = open_shard_set(banks["root"] / "bank2")
    old, new = open_shard_set(banks["old"]), open_shard_set(banks["new"])
    assert len(bank) == 64 and bank.manifest.parts[0].indices == kept
    for i in range(64):
        expected = old[kept[i]] if i < 38 else new[i - 38]
        served = bank.read(i, ("x", "label"))
        assert np.array_equal(served["x"], expected["x"]) and served["label"] == expected["label"]
    assert bank.lineage(0)["model_stage"] == 0 and bank.lineage(63) == lineage
    # Composing from a composed bank looks through it: parts stay over plain shard sets, lineage intact.
    again = resolve_parts(banks["root"] / "bank2", [1, 40, 37, 63])
    assert [(Path(p.path).name, p.indices) for p in again] == [("old", [kept[1], kept[37]]), ("new", [2, 25])]
    assert again[1].lineage == lineage


def test_label_map_and_a_rewritten_part_is_refused(banks, tmp_path):
    part = make_shards(tmp_path / "part", 8, num_classes=2, per_shard=8, seed=5)
    parts = [Part(str(part), list(range(8)), {}, [5, 7])]
    write_composed(tmp_path / "view", parts, open_shard_set, {"classes": list("abcdefgh")})
    view, plain = open_shard_set(tmp_path / "view"), open_shard_set(part)
    assert [view[i]["label"] for i in range(8)] == [[5, 7][plain[i]["label"]] for i in range(8)]
    make_shards(tmp_path / "part", 8, num_classes=2, per_shard=4, seed=6)  # rewritten after composition
    with pytest.raises(ShardError, match="rewritten after the set was composed"):
        open_shard_set(tmp_path / "view")
    with pytest.raises(ShardError, match="indices"):
        write_composed(tmp_path / "bad", [Part(str(part), [0, 8], {})], open_shard_set)


def test_every_steps_plan_over_a_composed_bank_is_the_same_on_one_and_two_ranks(banks, tiny):
    kept = resolve_parts(banks["old"], keep_subset(64, 38, (0, 2)))
    write_composed(banks["root"] / "planned", kept + [Part(str(banks["new"]), list(range(26)), {})], open_shard_set)
    bank = open_shard_set(banks["root"] / "planned")
    sources = {TARGET: open_shard_set(tiny["target"]), BANK: bank}
    planner = GlobalBatchPlanner(
        global_batch_size=8, num_target=len(sources[TARGET]), num_bank=len(bank), bank_ratio=0.5,
        bank_rounding="round", label_dropout=0.1, seed=0, split=TimestepSplit(1000, 1.0, "complement", 1.0),
    )  # fmt: skip
    for step in range(3):
        plan = planner.plan(step)
        whole = load_micro_batch(plan, slot_ids(rank=0, micro_step=0, world_size=1, accumulation_steps=1,
                                                micro_batch_size=8), sources)  # fmt: skip
        by_slot = {int(s): i for i, s in enumerate(whole.ids[:, 0])}
        for rank in range(2):
            slots = slot_ids(rank=rank, micro_step=0, world_size=2, accumulation_steps=1, micro_batch_size=4)
            part = load_micro_batch(plan, slots, sources)
            rows = [by_slot[int(s)] for s in part.ids[:, 0]]
            assert np.array_equal(part.ids, whole.ids[rows]) and torch.equal(part.x0, whole.x0[rows])
            assert torch.equal(part.noise, whole.noise[rows])


# --- the stages file ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tiny, tmp_path_factory) -> dict:
    """Three stages of tiny data: classes a, b; then b, c (one new); then d, e (two new, given as images that the
    driver prepares), with held-out sets."""
    root = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    save_feature_net(FeatureNet(num_features=16, width=8), root / "feature_net.pt")
    names = [["a", "b"], ["b", "c"], ["d", "e"]]
    stages = []
    for k, classes in enumerate(names):
        target = named_shards(root / f"target{k}", 16, classes, seed=10 + k)
        held_out = named_shards(root / f"eval{k}", 48, classes, seed=20 + k, per_shard=24)
        stages.append({"target": str(target), "steps": 4, "eval_data": str(held_out), "overrides": []})
    # Stage 2's EMA barely moves, so that it shows where it started: stage 1's EMA, carried on.
    stages[1]["overrides"] = ["optim.ema_decay=0.999999"]
    stages[2]["images"] = str(image_folder(root / "images2", names[2], per_class=8, seed=30))
    stages[2]["target"] = ""
    document = {
        "pretrained": str(tiny["pretrained"]), "config": "tiny_cpu", "mode": "evolving",
        "overrides": ["run.ckpt_every=2", "run.log_every=2", "bank.num_steps=3", "bank.batch_size=4",
                      "bank.samples_per_shard=2", "bank.preview=0", f"eval.feature_net={root / 'feature_net.pt'}",
                      "eval.num_samples=48", "eval.samples_per_shard=24", "eval.batch_size=4", "eval.sample_steps=3",
                      "eval.kid_subsets=2", "eval.grid_images=0", "prepare.resolution=8",
                      "prepare.samples_per_shard=8"],
        "bank": {"size": 10, "keep": 0.6, "seed": 0},
        "stages": stages,
    }  # fmt: skip
    path = root / "stages.yaml"
    path.write_text(json.dumps(document))  # JSON is YAML
    return {"root": root, "path": path, "document": document}


def write_stages(chain: dict, path: Path, **changes) -> Path:
    document = json.loads(json.dumps(chain["document"]))
    for key, value in changes.items():
        place, *rest = key.split("__")
        if rest:
            document["stages"][int(rest[0])][place] = value
        elif place in ("size", "keep"):
            document["bank"][place] = value
        else:
            document[place] = value
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"target__1": ""}, r"stages\[1\].target and stages\[1\].images are neither set"),
        ({"images__1": "/some/images"}, r"stages\[1\].target and stages\[1\].images are both set"),
        ({"keep": 1.5}, r"bank.keep=1.5 must lie in \[0, 1\]"),
        ({"keep": -0.1}, r"bank.keep=-0.1 must lie in \[0, 1\]"),
        ({"mode": "replay"}, r"mode='replay' is not one of"),
        ({"replay": 2.0}, r"replay=2.0 must lie in \[0, 1\]"),
        ({"steps__0": 0}, r"stages\[0\].steps=0 must be at least 1"),
        ({"overrides__2": ["train.stepz=3"]}, r"stages\[2\].*train.stepz"),
    ],
)
def test_bad_stages_stop_before_any_work_naming_the_key(chain, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_stages(str(write_stages(chain, tmp_path / "s.yaml", run_dir=str(tmp_path / "run"), **changes)))
    assert not (tmp_path / "run").exists()


def test_unknown_keys_and_data_that_does_not_fit_the_model_are_refused(chain, tmp_path):
    with pytest.raises(ConfigError, match="stages file key 'bank.kep'"):
        load_stages(str(chain["path"]), ["bank.kep=0.5"])
    wrong = make_shards(tmp_path / "wide", 4, shape=(3, 16, 16), num_classes=2, per_shard=4)
    with pytest.raises(ConfigError, match=r"stages\[1\].target=.*shape \(3, 16, 16\) but the model samples \(3, 8"):
        load_stages(str(write_stages(chain, tmp_path / "s.yaml", target__1=str(wrong))))
    with pytest.raises(ConfigError, match=r"stages\[2\].images=.*prepare.resolution=16 gives samples of shape "
                       r"\(3, 16, 16\) but the model samples \(3, 8, 8\): set prepare.resolution=8"):  # fmt: skip
        load_stages(str(chain["path"]), ["stages.2.overrides=[prepare.resolution=16]"])
    with pytest.raises(ConfigError, match=r"stages\[2\].images=.*missing is not a folder"):
        load_stages(str(chain["path"]), [f"stages.2.images={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=r"stages\[0\].eval_data=.* has classes \['c'\] that no target"):
        load_stages(
            str(write_stages(chain, tmp_path / "s.yaml", eval_data__0=chain["document"]["stages"][1]["eval_data"]))
        )


def test_a_changed_stages_file_is_refused_under_a_run_in_progress(chain, tmp_path):
    stages = load_stages(str(chain["path"]), [f"run_dir={tmp_path}"])
    (tmp_path / "stages.yaml.sha256").write_text(fingerprint(stages))
    check_run_in_progress(tmp_path, stages, allow_change=False)  # the same file: continues
    debug = load_stages(str(chain["path"]), [f"run_dir={tmp_path}", "stages.0.overrides=[debug.crash_rank=0]"])
    check_run_in_progress(tmp_path, debug, allow_change=False)  # fault injection is not a change
    changed = load_stages(str(chain["path"]), [f"run_dir={tmp_path}", "bank.keep=0.5"])
    with pytest.raises(ConfigError, match="the stages file differs .* --allow-stages-change"):
        check_run_in_progress(tmp_path, changed, allow_change=False)
    check_run_in_progress(tmp_path, changed, allow_change=True)


# --- the driver, launched as users launch it --------------------------------------------------------------------


def launch(chain: dict, run_dir: Path, num_procs: int, *overrides: str):
    return run_entry("continual.py", ["--stages", str(chain["path"]), f"run_dir={run_dir}", *overrides], num_procs)


@pytest.fixture(scope="module")
def evolving(chain) -> Path:
    """One 3-stage evolving-bank run on 2 ranks, shared by the assertions below."""
    run_dir = chain["root"] / "evolving"
    assert_ok(launch(chain, run_dir, 2))
    return run_dir


@slow
def test_every_stage_leaves_its_artefacts_and_a_row(evolving):
    rows = json.loads((evolving / "results.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == [1, 2, 3] and [row["num_classes"] for row in rows] == [2, 3, 5]
    assert [row["num_eval_images"] for row in rows] == [48, 96, 144]  # the held-out data accumulates
    assert all(np.isfinite(row["fid"]) for row in rows)
    for k in (1, 2, 3):
        stage = evolving / f"stage_{k:02d}"
        assert (stage / "done.json").is_file() and (stage / "train" / "checkpoints" / "latest").is_file()
        assert (stage / "train" / "export" / "ema" / "transformer").is_dir()
        assert (stage / "eval" / "results.json").is_file()
        assert [r["step"] for r in read_steps(stage)][-1] == 4
    prepared = open_shard_set(evolving / "stage_03" / "target_prepared")  # stage 3 was given as images
    assert len(prepared) == 16 and prepared.manifest.meta["classes"] == ["d", "e"]
    parts = read_composed(evolving / "stage_03" / "target").parts
    assert [Path(p.path) for p in parts] == [(evolving / "stage_03" / "target_prepared").resolve()]


def read_steps(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "train" / "metrics.jsonl").read_text().splitlines()]


@slow
def test_the_bank_keeps_a_seeded_share_and_records_each_samples_lineage(evolving):
    first, third = read_composed(evolving / "stage_01" / "bank"), read_composed(evolving / "stage_03" / "bank")
    assert [p.lineage["model_stage"] for p in first.parts] == [0] and first.num_samples == 10
    kept = resolve_parts(evolving / "stage_02" / "bank", keep_subset(10, 6, (0, 3)))
    assert [(p.path, p.indices) for p in third.parts[:-1]] == [(p.path, p.indices) for p in kept]
    assert third.parts[-1].lineage["model"] == str((evolving / "stage_02" / "model" / "ema").resolve())
    assert third.parts[-1].indices == [0, 1, 2, 3] and third.meta["num_kept"] == 6
    assert {p.lineage["bank_stage"] for p in third.parts} <= {1, 2, 3}


@slow
def test_the_class_table_grows_the_ema_carries_on_and_an_earlier_class_still_samples(evolving):
    first = DiTFamily.from_pretrained(str(evolving / "stage_01" / "model" / "raw"))
    grown = DiTFamily.from_pretrained(str(evolving / "stage_01" / "model" / "raw"), num_classes=3, class_init="grow")
    assert first.null_condition == 2 and grown.null_condition == 3
    key = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    old, new = first.denoiser.state_dict()[key], grown.denoiser.state_dict()[key]
    assert torch.equal(new[:2], old[:2]) and torch.equal(new[3], old[2])  # earlier rows and the null row kept
    # Stage 2 started its EMA from stage 1's EMA (grown the same way), not from the weights it trained from.
    first_ema = DiTFamily.from_pretrained(
        str(evolving / "stage_01" / "model" / "ema"), num_classes=3, class_init="grow"
    )
    second_ema = DiTFamily.from_pretrained(str(evolving / "stage_02" / "model" / "ema"))
    for name, tensor in second_ema.denoiser.state_dict().items():
        torch.testing.assert_close(tensor, first_ema.denoiser.state_dict()[name], rtol=0, atol=1e-5)
    drift = max((grown.denoiser.state_dict()[n] - t).abs().max() for n, t in first_ema.denoiser.state_dict().items())
    assert drift > 1e-4  # the raw weights are elsewhere: the check above could fail
    last = DiTFamily.from_pretrained(str(evolving / "stage_03" / "model" / "ema"))
    assert last.null_condition == 5
    sample = sample_class(evolving / "stage_03" / "model" / "ema", label=0)  # class "a", from stage 1
    assert sample.shape == (1, 3, 8, 8) and torch.isfinite(sample).all()


@slow
def test_a_run_killed_in_stage_2s_generation_then_training_resumes_to_the_same_banks_and_weights(chain, evolving):
    """One chain on 1 rank, killed in stage 2's bank generation (one of its two new shards recorded), rerun and
    killed in stage 2's training (in the save of step 4), rerun to the end. The 2-rank run above is the
    uninterrupted reference: the same plan, so the same weights up to the order of the gradient sum, and the same
    banks to the byte."""
    document = json.loads(json.dumps(chain["document"]))
    document["stages"] = [{**stage, "eval_data": None} for stage in document["stages"][:2]]
    carried = document["stages"][1]["overrides"]
    run_dir, path = chain["root"] / "killed", chain["root"] / "killed.yaml"

    def rerun(*debug: str):  # debug.* is not a change of the stages file
        document["stages"][1]["overrides"] = [*carried, *debug]
        path.write_text(json.dumps(document))
        return run_entry("continual.py", ["--stages", str(path), f"run_dir={run_dir}"])

    crashed = rerun("debug.crash_after_shards=1", "debug.crash_rank=0")
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    stage, new = run_dir / "stage_02", run_dir / "stage_02" / "bank_new"
    assert (run_dir / "stage_01" / "done.json").is_file() and not (stage / "done.json").exists()
    assert is_complete(new, 0, range(0, 2)) and not is_complete(new, 1, range(2, 4))  # 4 new samples, 2 a shard
    assert not (new / "manifest.json").exists() and not (stage / "bank").exists() and not (stage / "train").exists()
    first_shard = (new / shard_name(0)).stat()

    crashed = rerun("debug.crash_in_save_step=4", "debug.crash_rank=0")  # the last save
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert (new / "manifest.json").is_file() and not (stage / "done.json").exists()
    kept = (new / shard_name(0)).stat()  # the recorded shard was kept, not generated again
    assert (kept.st_ino, kept.st_mtime_ns) == (first_shard.st_ino, first_shard.st_mtime_ns)
    assert (stage / "train" / "checkpoints" / "latest").read_text() == "step_00000002"
    assert [r["step"] for r in read_steps(stage)] == [2, 4]  # step 4 logged, then killed in its save

    assert_ok(rerun())
    assert [r["step"] for r in read_steps(stage)] == [2, 4]  # the resume from step 2 logged step 4 again, once
    reference = evolving / "stage_02"
    for k in (1, 2):
        assert shard_hashes(run_dir / f"stage_{k:02d}" / "bank_new") == shard_hashes(
            evolving / f"stage_{k:02d}" / "bank_new"
        )
    assert [p.indices for p in read_composed(stage / "bank").parts] == [
        p.indices for p in read_composed(reference / "bank").parts
    ]
    for which in ("raw", "ema"):
        resumed = DiTFamily.from_pretrained(str(stage / "model" / which)).denoiser.state_dict()
        expected = DiTFamily.from_pretrained(str(reference / "model" / which)).denoiser.state_dict()
        for name, tensor in expected.items():
            torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_resumed_log_drops_the_steps_after_its_checkpoint_and_a_line_cut_short(tmp_path):
    lines = [json.dumps({"step": step, "loss/total": 0.5}) for step in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "lo')  # killed while writing
    MetricsLogger(tmp_path, True, 4, 10, progress=False).close()  # the resume from step 4's checkpoint
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"


def shard_hashes(directory: Path) -> list[str]:
    return [record.sha256 for record in read_manifest(directory).shards]


def test_slurm_template_runs_the_chain_and_requeues_a_preempted_one():
    from tests.slurm.test_slurm import dry_run

    out = dry_run("launch/slurm/continual.sbatch", "run_dir=/runs/c", "--until-stage", "2", STAGES="s.yaml")
    assert "--ntasks-per-node=4 --cpus-per-task=8 python launch/continual.py --stages s.yaml run_dir=/runs/c " \
           "--until-stage 2" in out  # fmt: skip
    for status in ("75", "138"):  # preempted in training / killed by USR1 outside it: both resume by rerunning
        requeued = dry_run("launch/slurm/continual.sbatch", STAGES="s.yaml", DRY_RUN_STATUS=status)
        assert "scontrol requeue 4242" in requeued
    failed = dry_run("launch/slurm/continual.sbatch", STAGES="s.yaml", expect=2, DRY_RUN_STATUS="2")
    assert "scontrol requeue" not in failed


def test_the_example_stages_file_parses_and_names_its_missing_data(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\].target=.*/missing: no shard manifest"):
        load_stages("configs/continual/digits.yaml", [f"stages.0.target={tmp_path / 'missing'}"])


def test_a_stage_target_maps_its_classes_onto_the_run_table_and_replays_a_share_of_earlier_ones(chain, tmp_path):
    shards = str(named_shards(tmp_path / "target2", 16, ["d", "e"], seed=12))  # stage 3 as shards, not images
    stages = load_stages(str(chain["path"]), ["replay=0.25", f"stages.2.target={shards}", 'stages.2.images=""'])
    classes = ["a", "b", "c", "d", "e"]
    parts = stage_target_parts(stages, 2, classes)
    write_composed(tmp_path / "target", parts, open_shard_set, {"classes": classes})
    target, own = open_shard_set(tmp_path / "target"), open_shard_set(stages.stages[2].target)
    assert len(target) == 16 + 4 + 4 and [p.lineage["stage"] for p in parts] == [3, 1, 2]
    assert [target[i]["label"] for i in range(16)] == [3 + own[i]["label"] for i in range(16)]  # d, e -> 3, 4
    assert {target[i]["label"] for i in range(16, 24)} <= {0, 1, 2}
    assert parts[1].indices == keep_subset(16, 4, (0, 3, 1)) and stage_target_parts(stages, 2, classes) == parts
    assert len(stage_target_parts(load_stages(str(chain["path"]), [f"stages.2.target={shards}", 'stages.2.images=""']),
                                  2, classes)) == 1  # replay=0: this stage only  # fmt: skip
