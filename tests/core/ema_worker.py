"""Checks the sharded EMA inside real DeepSpeed engines (launched by tests/test_ema.py on 1 or 2 CPU ranks).

For each engine configuration: trains a tiny DiT for a few steps beside a whole-copy reference EMA built from
DeepSpeed's own gathered fp32 master weights, checks a skipped update, `full_state_dict`, `swapped_in` and
the EMA bytes, saves the EMA, and loads the save of another world size (and another configuration). Then it
starts an EMA from a model folder (model.ema_from, streamed tensor by tensor into each rank's slice), counting the
bytes of the folder's tensors alive at once. Rank 0 writes what it found to `--out/<world>.json` for the test.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import weakref
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from diffusers import DiTTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

import trainer.ema_start
from tests.tiny import TINY_DIT
from trainer import distributed
from trainer.ema import ShardedEMA
from trainer.ema_start import fill_ema_from_folder

CONFIGS = {
    "z0": (0, "fp32"),
    "z1": (1, "fp32"),
    "z2": (2, "fp32"),
    "z3": (3, "fp32"),
    "z2bf16": (2, "bf16"),
    "z3bf16": (3, "bf16"),
}
DECAY = 0.8
SKIPPED_STEP = 2


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value back to the host (`.item()`, `bool()`, `float()` of a tensor)."""

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def build(stage: int, precision: str, world_size: int):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**TINY_DIT)
    with torch.no_grad():  # DiT zero-initialises its output layers: random weights make every gradient count
        for p in model.parameters():
            p.normal_(0, 0.05) if p.abs().sum() == 0 else None
    model.pos_embed.proj.bias.requires_grad_(False)  # a frozen parameter: has no EMA, comes from the module
    trained = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_batch_size": 2 * world_size,
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 500},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(trained, lr=0.02), config=config
    )  # fmt: skip
    return engine


def batch(step: int, rank: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    return (
        x.to(dtype),
        torch.randint(0, 1000, (2,), generator=generator),
        torch.randint(0, 10, (2,), generator=generator),
    )


def forward(engine, step: int, rank: int) -> torch.Tensor:
    x, t, y = batch(step, rank, next(engine.module.parameters()).dtype)
    return engine(x, timestep=t, class_labels=y).sample.float()


def master_weights(engine) -> dict[str, torch.Tensor]:
    """Every trained parameter's whole fp32 master, gathered by DeepSpeed itself (a collective)."""
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            whole = safe_get_full_fp32_param(p) if engine.zero_optimization_stage() else p.detach().float()
            out[name] = whole.detach().clone().cpu()
    return out


def module_weights(engine) -> dict[str, torch.Tensor]:
    """The module's whole weights as it computes with them (a collective under ZeRO-3)."""
    with distributed.full_parameters(engine.module):
        return {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}


def max_relative_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float(((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-12)).max()) for k in a)


def train_and_check(engine, steps: int, out: Path, rank: int, world_size: int) -> dict:
    ema = ShardedEMA(engine, DECAY)
    found = {"num_bytes": ema.num_bytes}
    reference = master_weights(engine)
    for step in range(steps):
        loss = forward(engine, step, rank).sub(1.0).pow(2).mean()
        engine.backward(loss)
        engine.step()
        applied = step != SKIPPED_STEP
        before = [s.clone() for s in ema.shadow]
        with HostReads() as reads:
            ema.update(torch.tensor(float(applied)))
        found["host_reads_in_update"] = found.get("host_reads_in_update", 0) + reads.count
        if not applied:
            found["skip_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, ema.shadow))
        masters = master_weights(engine)
        if applied:
            for key, value in masters.items():
                reference[key].lerp_(value, 1.0 - DECAY)
    full = ema.full_state_dict()
    module = module_weights(engine)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        trained = {k: full[k] for k in reference}
        found["error_vs_whole_copy"] = max_relative_error(trained, reference)
        found["ema_differs_from_weights"] = max_relative_error(trained, masters) > 1e-3
        found["untrained_from_module"] = all(
            torch.equal(full[k], module[k].float()) for k in module if k not in reference
        )
        found["keys"] = sorted(full) == sorted(module)
        torch.save(full, out / "reference.pt")
    found.update(check_swap(engine, ema, full, module, rank))
    ema.save(out, rank)
    return found


def check_swap(engine, ema: ShardedEMA, full: dict | None, module_before: dict, rank: int) -> dict:
    """Inside `swapped_in` the module computes with the EMA; after it, everything is as before, bit for bit."""
    masters_before = [m.clone() for m in ema.masters]
    engine.module.eval()  # DiT drops labels at random in training mode
    with torch.no_grad():
        output_before = forward(engine, 99, rank)
        with ema.swapped_in():
            inside = module_weights(engine)
            output_inside = forward(engine, 99, rank)
        output_after = forward(engine, 99, rank)
    engine.module.train()
    after = module_weights(engine)
    found = {
        "restored_weights": all(torch.equal(after[k], module_before[k]) for k in module_before),
        "restored_masters": all(torch.equal(a, b) for a, b in zip(masters_before, ema.masters)),
        "restored_output": torch.equal(output_before, output_after),
        "swap_changes_output": not torch.equal(output_before, output_inside),
    }
    if rank == 0:
        found["inside_is_ema"] = all(torch.equal(inside[k], full[k].to(inside[k].dtype)) for k in inside)
    return found


def load_and_check(engine, source: Path, rank: int) -> bool | None:
    ema = ShardedEMA(engine, DECAY)
    ema.load(source, rank)
    full = ema.full_state_dict()
    if rank != 0:
        return None
    expected = torch.load(source / "reference.pt", weights_only=True)
    # Frozen weights come from this engine's module (a bf16 run's are rounded): compare the EMA itself.
    return sorted(full) == sorted(expected) and all(torch.equal(full[k], expected[k]) for k in ema.shapes)


def load_errors(engine, source: Path, scratch: Path) -> dict[str, str]:
    """The messages of loads that must fail: a missing rank file, a save of another model (one process)."""
    messages = {}
    for case in ("missing_file", "other_model"):
        folder = scratch / case
        shutil.copytree(source, folder)
        files = sorted((folder / "ema").glob("rank_*.pt"))
        if case == "missing_file":
            files[-1].unlink()
        else:
            saved = torch.load(files[0], weights_only=True)
            saved["params"]["renamed.weight"] = saved["params"].pop(next(iter(saved["params"])))
            torch.save(saved, files[0])
        try:
            ShardedEMA(engine, DECAY).load(folder, 0)
            messages[case] = "no error"
        except (FileNotFoundError, ValueError) as error:
            messages[case] = str(error)
    return messages


class CountedReads:
    """Wraps the weight reader of trainer/ema_start.py: the bytes of the folder's tensors alive at once (a tensor
    counts from its read until it is freed), their peak, and the largest and total bytes of the tensors read."""

    def __init__(self):
        self.live = self.peak = self.largest = self.total = self.reads = 0
        self.open_weights = trainer.ema_start.open_weights

    def __enter__(self):
        def counted_open(*args, **kwargs):
            source = self.open_weights(*args, **kwargs)
            read = source.read
            source.read = lambda name: self.count(read(name))
            return source

        trainer.ema_start.open_weights = counted_open
        return self

    def __exit__(self, *exc):
        trainer.ema_start.open_weights = self.open_weights

    def count(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)
        self.total, self.reads = self.total + size, self.reads + 1
        weakref.finalize(tensor, self.release, size)
        return tensor

    def release(self, size: int) -> None:
        self.live -= size


def ema_folder(out: Path, rank: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny DiT of the engines' shape with other weights, saved as a diffusers folder (safetensors)."""
    folder = out / "ema_from"
    torch.manual_seed(7)
    model = DiTTransformer2DModel(**TINY_DIT)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    if rank == 0 and not folder.is_dir():
        model.save_pretrained(folder)
    distributed.barrier()
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_ema_from(engine, folder: Path, weights: dict[str, torch.Tensor], rank: int) -> dict:
    """The EMA started from the folder equals its weights exactly; each rank held at most one tensor at a time."""
    ema = ShardedEMA(engine, DECAY)
    with CountedReads() as reads:
        fill_ema_from_folder(ema, folder)
    full = ema.full_state_dict()
    found = {
        "peak_live_bytes": reads.peak, "largest_tensor_bytes": reads.largest, "bytes_read": reads.total,
        "tensors_read": reads.reads, "ema_bytes": ema.num_bytes,
    }  # fmt: skip
    per_rank = gather_objects(found)
    if rank != 0:
        return {}
    return {
        "equals_folder": bool(ema.shapes) and all(torch.equal(full[k], weights[k].float()) for k in ema.shapes),
        "folder_bytes": sum(t.numel() * t.element_size() for t in weights.values()),
        "ranks": per_rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--load-from", type=Path, help="a folder another world size wrote: load its saves")
    parser.add_argument("--tag", required=True, help="the name of the JSON written to --out")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world_size, _ = distributed.init()
    results, names = {}, list(CONFIGS)
    ema_from, ema_from_weights = ema_folder(args.out, rank)
    for index, name in enumerate(names):
        stage, precision = CONFIGS[name]
        started = time.time()
        engine = build(stage, precision, world_size)
        print(f"{name}: built in {time.time() - started:.1f}s", flush=True)
        folder = args.out / f"w{world_size}" / name
        found = train_and_check(engine, args.steps, folder, rank, world_size) if args.steps else {}
        if args.load_from is not None:  # the same configuration, and another one (other stage / precision)
            for source in (name, names[(index + 1) % len(names)]):
                found[f"load_{source}"] = load_and_check(engine, args.load_from / source, rank)
        found["num_bytes_all_ranks"] = gather_objects(found.get("num_bytes", ShardedEMA(engine, DECAY).num_bytes))
        found["ema_from"] = check_ema_from(engine, ema_from, ema_from_weights, rank)
        results[name] = found
        print(f"{name}: done in {time.time() - started:.1f}s", flush=True)
        distributed.barrier()
    if rank == 0:
        if args.load_from is not None and world_size == 1:
            results["errors"] = load_errors(engine, args.load_from / names[-1], args.out / "broken")
        (args.out / f"{args.tag}.json").write_text(json.dumps(results, indent=1))
    distributed.destroy()


def gather_objects(value):
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


if __name__ == "__main__":
    main()
