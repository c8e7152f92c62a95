"""Exponential moving average of the trained weights, sharded the way ZeRO shards the fp32 master weights.

Each rank keeps the EMA of the fp32 master slice it owns (ZeRO-1/2: its flat partition of every
parameter group; ZeRO-3: its parameter partitions; ZeRO-0: the whole trained parameters, which nothing
shards), so the EMA costs about 4·N/W bytes per rank and its update is one fused op with no
communication and no host read. Gathering happens only to sample (`swapped_in`), export
(`full_state_dict`) and never to save: a checkpoint holds each rank's fragments indexed by their position
in the flattened parameter, so it loads on any world size and ZeRO stage (an elastic resume keeps the EMA).
Assumes pure data parallelism (the ZeRO partition group is the world).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from data.files import atomic_write

FOLDER = "ema"
FORMAT = 1


@dataclass(frozen=True)
class Fragment:
    """Elements [start, start + numel) of a flattened parameter, held at `offset` in EMA flat `flat`."""

    flat: int
    offset: int
    start: int
    numel: int


class ShardedEMA:
    def __init__(self, engine, decay: float):
        """Starts from the current fp32 master weights; build it after `deepspeed.initialize`."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"optim.ema_decay={decay}: the EMA decay must lie in [0, 1), e.g. 0.9999")
        self.module, self.optimizer, self.decay = engine.module, engine.optimizer, decay
        self.stage = engine.zero_optimization_stage()
        if engine.zero_cpu_offload() or engine.zero_offload_param():
            raise ValueError("the sharded EMA keeps beside the device's fp32 master weights: turn ZeRO offload off")
        if self.stage == 0 and engine.bfloat16_enabled():
            raise ValueError("train.precision=bf16 needs train.zero_stage >= 1 (the EMA follows ZeRO's fp32 master)")
        names = {id(p): name for name, p in self.module.named_parameters()}
        self.trained, self.masters, self.fragments = _layout(self.stage, self.module, self.optimizer, names)
        self.shapes = {names[id(p)]: tuple(getattr(p, "ds_shape", p.shape)) for p in self.trained}
        if any(m.dtype != torch.float32 for m in self.masters):
            raise ValueError("the EMA needs fp32 master weights; fp16 training is not supported")
        self.shadow = [m.detach().clone() for m in self.masters]

    @property
    def num_bytes(self) -> int:
        """EMA bytes held by this rank."""
        return sum(t.numel() * t.element_size() for t in self.shadow)

    @torch.no_grad()
    def update(self, applied: torch.Tensor) -> None:
        """ema <- lerp(ema, master, (1 - decay) * applied); `applied` is a 0-d device tensor, 1 or 0.

        A skipped step (applied = 0) leaves the EMA as it was, decided on the device without a host read.
        """
        weight = applied.to(torch.float32) * (1.0 - self.decay)
        # One 0-d weight tensor per flat: passing the 0-d tensor alone picks the Scalar overload, which
        # reads it back to the host (a sync per step on a GPU).
        torch._foreach_lerp_(self.shadow, self.masters, [weight] * len(self.shadow))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """A collective: rank 0 gets the module's whole state dict (fp32, CPU) with the EMA for trained
        parameters, gathered one parameter at a time; other ranks get None."""
        rank = dist.get_rank()
        trained = {id(p) for p in self.trained}
        names = {id(p): name for name, p in self.module.named_parameters()}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in self.module.state_dict(keep_vars=True).items():
            value = self._gather_ema(names[id(tensor)]) if id(tensor) in trained else _gather_module_tensor(tensor)
            if rank == 0:
                out[key] = value
        return out if rank == 0 else None

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """A collective: inside, the training module computes with the EMA weights (in its own precision);
        on exit its weights are restored from the fp32 master, exactly as the optimizer step leaves them."""
        backups = self._write_to_module(self.shadow)
        try:
            yield
        finally:
            self._restore_module(backups)

    def save(self, directory: Path, rank: int) -> None:
        """Every rank writes its own fragments (no gather) to `directory/ema/rank_NNNNN.pt`, atomically."""
        num_files = 1 if self.stage == 0 else dist.get_world_size()
        if rank >= num_files:  # ZeRO-0: every rank holds the same whole EMA; rank 0 writes it
            return
        flats = [s.detach().cpu().view(-1) for s in self.shadow]
        params = {
            name: {"shape": list(self.shapes[name]), "start": f.start, "values": flats[f.flat][f.offset :][: f.numel]}
            for name, f in self.fragments.items()
        }
        payload = {"format": FORMAT, "num_files": num_files, "params": params}
        atomic_write(Path(directory) / FOLDER / f"rank_{rank:05d}.pt", lambda file: torch.save(payload, file))

    @torch.no_grad()
    def load(self, directory: Path, rank: int) -> None:
        """Fills this rank's EMA slice from a save made on any world size and ZeRO stage; reads only the
        overlapping parts of the files (memory-mapped)."""
        saved = _open_saved(Path(directory))
        expected = {name: list(shape) for name, shape in self.shapes.items()}
        found = {name: entry["shape"] for file in saved for name, entry in file["params"].items()}
        if found != expected:
            differ = sorted(set(found) ^ set(expected)) or sorted(n for n in found if found[n] != expected[n])
            raise ValueError(
                f"{Path(directory) / FOLDER}: the saved EMA does not match the model's trained parameters "
                f"({differ[:5]} differ); resume with the model and tuning settings the run was saved with"
            )
        for name, frag in self.fragments.items():
            target = self.shadow[frag.flat].view(-1).narrow(0, frag.offset, frag.numel)
            covered = 0
            for file in saved:
                entry = file["params"].get(name)
                if entry is None:
                    continue
                low = max(frag.start, entry["start"])
                high = min(frag.start + frag.numel, entry["start"] + entry["values"].numel())
                if low < high:
                    values = entry["values"].narrow(0, low - entry["start"], high - low)
                    target.narrow(0, low - frag.start, high - low).copy_(values)
                    covered += high - low
            if covered != frag.numel:
                raise ValueError(
                    f"{Path(directory) / FOLDER}: the saved EMA of {name} is incomplete (a file is missing)"
                )

    def _gather_ema(self, name: str) -> torch.Tensor | None:
        """The whole EMA of one parameter on rank 0 (a collective unless ZeRO-0)."""
        frag, shape = self.fragments.get(name), self.shapes[name]
        if self.stage == 0:
            whole = self.shadow[frag.flat]
            return whole.detach().cpu().clone() if dist.get_rank() == 0 else None
        full = torch.zeros(torch.Size(shape).numel(), dtype=torch.float32, device=self.shadow[0].device)
        if frag is not None:
            full.narrow(0, frag.start, frag.numel).copy_(self.shadow[frag.flat].narrow(0, frag.offset, frag.numel))
        dist.reduce(full, dst=0)  # the ranks' fragments are disjoint: the sum places each one
        return full.view(shape).cpu() if dist.get_rank() == 0 else None

    @torch.no_grad()
    def _write_to_module(self, flats: list[torch.Tensor]) -> list:
        if self.stage == 0:
            originals = [p.data for p in self.trained]
            for p, flat in zip(self.trained, flats):
                p.data = flat
            return originals
        if self.stage in (1, 2):
            opt = self.optimizer
            for i, flat in enumerate(flats):
                opt.parallel_partitioned_bit16_groups[i][dist.get_rank(opt.real_dp_process_group[i])].copy_(flat)
            _all_gather_bit16(opt)
            return []
        opt = self.optimizer
        # Release every gathered copy, small "persistent" ones too (as the step does): the next forward
        # gathers them again from the partitions written here.
        opt.parameter_offload.partition_all_parameters()
        # In fp32 the optimizer's master flat is the partition itself: keep a copy to restore from.
        partitions = opt.fp16_partitioned_groups_flat
        backups = [m.clone() if _same_storage(lp, m) else None for lp, m in zip(partitions, self.masters)]
        for lp, flat in zip(partitions, flats):
            lp.copy_(flat)
        return backups

    @torch.no_grad()
    def _restore_module(self, backups: list) -> None:
        if self.stage == 0:
            for p, original in zip(self.trained, backups):
                p.data = original
        elif self.stage in (1, 2):
            self.optimizer.update_lp_params()  # bit16 partitions <- fp32 master, then all-gather
        else:
            opt = self.optimizer
            opt.parameter_offload.partition_all_parameters()
            for lp, master, backup in zip(opt.fp16_partitioned_groups_flat, self.masters, backups):
                if backup is not None:
                    master.copy_(backup)
                else:
                    lp.copy_(master)


def _layout(stage: int, module: torch.nn.Module, optimizer, names: dict[int, str]):
    """(trained parameters, fp32 master flats, this rank's fragment of each trained parameter by name)."""
    if stage == 0:
        trained = [p for p in module.parameters() if p.requires_grad]
        masters = [p.detach() for p in trained]
        fragments = {names[id(p)]: Fragment(i, 0, 0, p.numel()) for i, p in enumerate(trained)}
        return trained, masters, fragments
    if stage in (1, 2):
        trained = [p for group in optimizer.bit16_groups for p in group]
        fragments = {}
        for i, group in enumerate(optimizer.bit16_groups):
            for p in group:
                mapping = getattr(p, "_hp_mapping", None)  # None: no element of p in this rank's partition
                if mapping is not None:
                    hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                    fragments[names[id(p)]] = Fragment(i, hp.start, lp.start, hp.numel)
        return trained, list(optimizer.single_partition_of_fp32_groups), fragments
    trained, fragments = [p for group in optimizer.fp16_groups for p in group], {}
    for i, group in enumerate(optimizer.fp16_groups):
        offset = 0
        for p in group:
            size = p.partition_numel()  # every rank's partition has this size; the last one is padded
            start = size * dist.get_rank(p.ds_process_group)
            numel = max(0, min(size, p.ds_numel - start))
            if numel:
                fragments[names[id(p)]] = Fragment(i, offset, start, numel)
            offset += size
    return trained, list(optimizer.fp32_partitioned_groups_flat), fragments


def _gather_module_tensor(tensor: torch.Tensor) -> torch.Tensor | None:
    """A frozen parameter or buffer, whole on rank 0 (a collective for a ZeRO-3 parameter)."""
    if hasattr(tensor, "ds_id"):
        with deepspeed.zero.GatheredParameters([tensor]):
            return _host_copy(tensor) if dist.get_rank() == 0 else None
    return _host_copy(tensor) if dist.get_rank() == 0 else None


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).cpu().clone()


def _all_gather_bit16(optimizer) -> None:
    from deepspeed.runtime.utils import all_gather_dp_groups

    all_gather_dp_groups(
        groups_flat=optimizer.bit16_groups_flat, partitioned_param_groups=optimizer.parallel_partitioned_bit16_groups,
        dp_process_group=optimizer.real_dp_process_group, start_alignment_factor=optimizer.nccl_start_alignment_factor,
        allgather_bucket_size=optimizer.allgather_bucket_size,
    )  # fmt: skip


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype


def _open_saved(directory: Path) -> list[dict]:
    folder = directory / FOLDER

    def open_file(rank: int) -> dict:
        path = folder / f"rank_{rank:05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the checkpoint's EMA is incomplete (this file is missing)")
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    first = open_file(0)
    return [first] + [open_file(r) for r in range(1, first["num_files"])]


def read_saved(directory: Path) -> dict[str, torch.Tensor]:
    """The whole EMA of every trained parameter from a checkpoint folder, without a process group (tools, tests)."""
    out: dict[str, torch.Tensor] = {}
    for file in _open_saved(Path(directory)):
        for name, entry in file["params"].items():
            whole = out.setdefault(name, torch.empty(entry["shape"], dtype=torch.float32))
            whole.view(-1).narrow(0, entry["start"], entry["values"].numel()).copy_(entry["values"])
    return out
