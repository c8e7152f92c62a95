"""ZeRO-3 builds the DiT partitioned (`deepspeed.zero.Init`), streams the pre-trained weights into it, and trains its
one shared timestep/label embedder: 2 real CPU ranks.

Run as a script (under `deepspeed --num_gpus 2`), it is the probe each rank runs: it loads the family as the training
job does, records how much of each parameter the rank holds, compares the gathered weights with the folder's, takes
one DeepSpeed step and exports the result.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from tests.conftest import (
    ROOT,
    assert_ok,
    copy_as_stopped_after,
    read_metrics,
    run_entry,
    run_script,
    train_args,
)
from tests.core.test_train_distributed import exported
from tests.tiny import make_tiny_dit

EMBEDDER_KEYS = (
    "norm1.emb.timestep_embedder.linear_1.weight",
    "norm1.emb.timestep_embedder.linear_2.bias",
    "norm1.emb.class_embedder.embedding_table.weight",
)


def make_dit_with_one_embedder(folder: Path, num_layers: int = 3) -> Path:
    """A tiny diffusers DiT laid out as weights converted from DiT: every block holds the same embedder."""
    make_tiny_dit(folder, num_layers=num_layers)
    model = DiTTransformer2DModel.from_pretrained(folder / "transformer")
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    model.save_pretrained(folder / "transformer")
    return folder


def probe(out: Path, overrides: list[str]) -> None:
    import deepspeed
    import torch.distributed as dist

    from trainer import distributed
    from trainer.config import gradient_accumulation_steps, load_config
    from trainer.engine import build_engine
    from trainer.setup import load_family

    rank, world_size, _ = distributed.init()
    cfg = load_config("tiny_cpu", overrides)
    family = load_family(cfg, training=True)
    parameters = dict(family.denoiser.named_parameters())
    report = {
        "shared_embedder": family.shared_embedder,
        "held": sum(p.ds_tensor.numel() for p in parameters.values()),
        "whole": sum(p.ds_numel for p in parameters.values()),
        "largest_held_fraction": max(p.ds_tensor.numel() / p.ds_numel for p in parameters.values()),
        "released": all(p.data.numel() == 0 for p in parameters.values()),
    }
    plain = dict(load_family(cfg).denoiser.named_parameters())  # the folder's weights, relabelled, whole
    errors = {}
    for name, parameter in parameters.items():
        with deepspeed.zero.GatheredParameters([parameter]):
            errors[name] = float((parameter.detach() - plain[name].detach()).abs().max())
    report["load_error"] = max(errors.values())
    report["names"] = sorted(parameters) == sorted(plain)

    tuned = family.tunable_parameters(family.denoiser)
    accumulation = gradient_accumulation_steps(cfg, world_size)
    engine, optimizer = build_engine(cfg, family.denoiser, tuned, accumulation, False, torch.device("cpu"))
    # What a GPU step relies on: no throughput timer (it synchronises the device), overlapped ZeRO communication,
    # the collective timeout, and the ranks agreeing on one rank's finding or reading.
    report["throughput_timer"] = engine.tput_timer.config.enabled
    report["overlap_comm"] = engine.zero_overlap_comm()
    report["timeout_s"] = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    report["first_error"] = distributed.first_error("shard 7 is bad" if rank == 1 else None)
    report["from_rank0"] = distributed.from_rank0(lambda: f"read by rank {rank}")
    try:
        distributed.from_rank0(lambda: {}["latest"])
    except KeyError as err:
        report["rank0_error"] = str(err)
    generator = torch.Generator().manual_seed(rank)
    batch = cfg.train.micro_batch_size
    x = torch.randn((batch, *family.sample_shape), generator=generator)
    t, labels = torch.randint(0, 1000, (batch,), generator=generator), torch.arange(batch) % family.null_condition
    optimizer.begin_step()
    engine.backward(family.predict(engine, x, t, labels).square().mean())
    engine.step()
    with distributed.full_parameters(engine.module):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        family.export(state, out / "export")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def losses(run_dir: Path) -> list[float]:
    return [m["loss/total"] for m in read_metrics(run_dir) if "loss/total" in m]


def launch(out: Path, *overrides: str) -> list[dict]:
    assert_ok(run_script(Path(__file__).resolve(), [str(out), *overrides], num_procs=2))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_zero3_builds_partitioned_and_trains_one_embedder(tmp_path):
    """Under ZeRO-3 each rank holds about half of every parameter as soon as the family is loaded (none whole), the
    gathered weights are the folder's (label table relabelled on the stream), and a DeepSpeed step on the tied
    embedder exports identical per-block copies that moved."""
    pretrained = make_dit_with_one_embedder(tmp_path / "pretrained")
    reports = launch(
        tmp_path / "probe", "train.zero_stage=3", f"model.pretrained={pretrained}", "model.num_classes=4",
        "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=0.01",
    )  # fmt: skip
    for report in reports:
        assert report["shared_embedder"] and report["names"] and report["released"]
        assert 0.45 < report["held"] / report["whole"] < 0.6, report
        assert report["largest_held_fraction"] <= 0.5 + 1e-9
        assert report["load_error"] == 0.0
        assert report["throughput_timer"] is False and report["overlap_comm"] is True
        assert report["timeout_s"] == 30 * 60  # distributed.init's default, train.collective_timeout_minutes'
        assert report["first_error"] == "shard 7 is bad" and report["from_rank0"] == "read by rank 0"
        assert report["rank0_error"] == "'latest'"  # rank 0's failure raised on every rank, none left waiting
    before = DiTTransformer2DModel.from_pretrained(pretrained / "transformer").state_dict()
    after = DiTTransformer2DModel.from_pretrained(tmp_path / "probe" / "export" / "transformer").state_dict()
    for key in EMBEDDER_KEYS:
        first = after[f"transformer_blocks.0.{key}"]
        assert not torch.allclose(first[:4], before[f"transformer_blocks.0.{key}"][:4])
        for block in (1, 2):
            assert torch.equal(after[f"transformer_blocks.{block}.{key}"], first), (block, key)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from launch.common import exit_process

    arguments = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    status = 1
    try:
        probe(Path(arguments[0]), arguments[1:])
        status = 0
    except BaseException:
        traceback.print_exc()  # printed before the process ends without the interpreter's teardown
    finally:
        exit_process(status)


@pytest.mark.slow
def test_shared_embedder_resumes_elastically(tiny, tmp_path):
    """A DiT with one shared embedder through the training job: ZeRO-2 on 2 ranks, saved at step 3 and resumed on 1
    rank (DeepSpeed's universal checkpoint), is the straight 2-rank run; every exported block copy is the same."""
    pretrained = make_dit_with_one_embedder(tmp_path / "pretrained", num_layers=2)
    data = {**tiny, "pretrained": pretrained}
    common = ("train.steps=6", "run.ckpt_every=3", "train.zero_stage=2")
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    assert_ok(run_entry("train.py", train_args(data, straight, *common), num_procs=2))
    copy_as_stopped_after(straight, elastic, 3)
    assert_ok(run_entry("train.py", train_args(data, elastic, *common) + ["--resume"], num_procs=1))
    assert (elastic / "checkpoints" / "step_00000003_universal").is_dir()
    np.testing.assert_allclose(losses(elastic), losses(straight), rtol=1e-5)
    for which in ("raw", "ema"):
        a, b = exported(elastic, which), exported(straight, which)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=f"{which}: {key}")
        for key in EMBEDDER_KEYS:
            assert torch.equal(a[f"transformer_blocks.1.{key}"], a[f"transformer_blocks.0.{key}"]), (which, key)
