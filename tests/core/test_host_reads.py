"""DESIGN invariant 6: a training step that neither logs nor saves reads nothing back from the device.

Counted with `HostReadCounter` (a TorchDispatchMode on `aten._local_scalar_dense`, plus `Tensor.tolist` and
`Tensor.numpy`, which on the CPU read memory without dispatching). Reads are attributed by the innermost
frame outside torch: the project's code must read nothing in any configuration; DeepSpeed's own reads are
counted and, for the presets' configuration (ZeRO-2 + bf16), must be zero too. torch's optimizer reading its
own host-side step counters would be told apart by its frames in torch/optim (the fused AdamW makes none).
"""

from __future__ import annotations

import json

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from tests.conftest import assert_ok, run_entry, train_args
from trainer.host_reads import HostReadCounter, host_side
from trainer.optim import SkipCounters


def test_the_counter_sees_every_kind_of_read():
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostReadCounter() as counter:
        x.sum().item()
        bool(x[0] > 0)
        float(x.max())
        x.tolist()
        x[x > 0]  # boolean-mask indexing needs the count of true elements on the host
        SkipCounters(torch.device("cpu"), 3).read()  # project code
        host_side(torch.ones(1)).item()  # a host-resident flag: listed apart
        get_accelerator().synchronize()  # what DeepSpeed's throughput timer calls at every forward and step
    counts, sites = counter.take()
    assert counts["other"] >= 5 and counts["project"] == 1 and counts["host_side"] == 1
    assert counts["device_sync"] == 1
    assert "synchronize" not in vars(get_accelerator())  # the accelerator's own method again
    assert any("trainer/optim.py" in site for site in sites)


def quiet_steps(run_dir, rank: int) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "host_reads" / f"rank_{rank:05d}.jsonl").read_text().splitlines()]
    return [line for line in lines if not line["logged"] and not line["saved"]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_procs,zero_stage,precision",
    [(1, 0, "fp32"), (2, 2, "bf16"), (2, 3, "bf16")],  # 1 and 2 ranks, ZeRO 0/2/3, fp32 and bf16
)
def test_steps_that_neither_log_nor_save_read_nothing(tiny, tmp_path, num_procs, zero_stage, precision):
    run = tmp_path / "run"
    args = ("train.steps=6", "run.log_every=3", "run.ckpt_every=100", "run.export=false", "debug.count_host_reads=true",
            f"train.zero_stage={zero_stage}", f"train.precision={precision}")  # fmt: skip
    assert_ok(run_entry("train.py", train_args(tiny, run, *args), num_procs=num_procs))
    for rank in range(num_procs):
        steps = quiet_steps(run, rank)
        assert [s["step"] for s in steps] == [1, 2, 4, 5]
        assert all(s["by_origin"].get("project", 0) == 0 for s in steps), steps
        # DeepSpeed's throughput timer is off in the engine's config: no device synchronisation in a step.
        assert all(s["by_origin"].get("device_sync", 0) == 0 for s in steps), steps
        if zero_stage == 2 and precision == "bf16":  # the presets' configuration: no read at all
            assert all(s["total"] == 0 for s in steps), steps
    # The counter works in these runs too: log and save steps do read (losses, LR, checkpoint).
    lines = (run / "host_reads" / "rank_00000.jsonl").read_text().splitlines()
    assert json.loads(lines[2])["by_origin"]["project"] > 0


def test_host_masks_reach_the_device_without_a_host_wait():
    """The plan's null mask and row indices go to the device from pinned memory, non-blocking, on CUDA (a pageable
    copy blocks the host); on the CPU they stay what they are."""
    from models.family import to_device

    mask = torch.tensor([True, False, True])
    assert to_device(mask, torch.device("cpu")) is mask
    if torch.cuda.is_available():
        moved = to_device(mask, torch.device("cuda"))
        assert moved.is_cuda and moved.cpu().tolist() == [True, False, True]
