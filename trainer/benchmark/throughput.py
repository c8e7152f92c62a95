"""The throughput benchmark: the real trainer against a minimal PyTorch loop, on the same model and batch.

Every rank runs it (`deepspeed launch/benchmark.py --config X ...`). In rounds, alternating so that drift of
the machine hits all of them, it runs Diff-Tuning, Diff-Tuning with knowledge distillation in place of the bank
(`method.retention=kd data.bank=null`: a frozen teacher's forward on the retention slots; not under ZeRO-3, which
refuses it), plain fine-tuning (the same config with `method.bank_ratio=0 method.tau=0`) through
`trainer.loop.train`, the function `launch/train.py` calls, and a
loop of DiT's `train.py` shape: torch AdamW, an EMA update, `diffusion_loss` with the schedule, the data
already in memory, DDP when there are several ranks. Step times are medians over logging intervals after the
warm-up ones. FLOPs of one step are counted once with `FlopCounterMode` on the real model and micro-batch.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from data.batch import StepLoader
from data.sampler import slot_ids
from trainer import distributed
from trainer.config import Config, ConfigError, gradient_accumulation_steps, load_config, with_micro_batch
from trainer.loop import train
from trainer.loss import NoiseSchedule, diffusion_loss
from trainer.retention import RETENTION
from trainer.setup import build_planner, load_family, open_sources

# Dense tensor-core peaks in TFLOP/s (no 2:4 sparsity), from the vendors' datasheets: bf16; tf32 (fp32 matmuls
# with train.tf32 on); fp32 (the CUDA cores' plain FP32, train.tf32 off). SXM figures for the SXM parts; NVL and
# PCIe parts run at lower clocks and power and have their own rows.
GPU_PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H200 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H800 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H800 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H20": {"bf16": 148.0, "tf32": 74.0, "fp32": 44.0},
    "B200": {"bf16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe, 40 and 80 GB alike
    "A800": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
}
# torch.cuda.get_device_name() as the driver reports it -> the row above. Matched whole (case, "NVIDIA " and
# "-" vs " " aside), never by substring: "H100 NVL" contains "H100" but is not an SXM part. A name not listed
# has no known peak and its MFU is reported as unknown (--peak_tflops gives it).
GPU_NAMES = {
    "H100 80GB HBM3": "H100 SXM", "H100 NVL": "H100 NVL", "H100 PCIe": "H100 PCIe", "H200": "H200 SXM",
    "H200 NVL": "H200 NVL", "H800": "H800 SXM", "H800 PCIe": "H800 PCIe", "H20": "H20", "B200": "B200",
    "A100-SXM4-40GB": "A100", "A100-SXM4-80GB": "A100", "A100-SXM-80GB": "A100", "A100-PCIE-40GB": "A100",
    "A100 80GB PCIe": "A100", "A800-SXM4-80GB": "A800", "A800 80GB PCIe": "A800", "L40S": "L40S", "L40": "L40",
    "L4": "L4", "A10": "A10",
}  # fmt: skip
FINETUNE = ["method.bank_ratio=0", "method.tau=0"]
# The bank's lambda is bank replay's only; KD weighs its slots by method.kd_weight (and refuses another lambda).
KD = ["method.retention=kd", "data.bank=null", "method.bank_loss_weight=1"]
VARIANT_OVERRIDES = {"difftune": [], "kd": KD, "finetune": FINETUNE}  # trainer runs; "plain" is the minimal loop
VARIANTS = ("difftune", "kd", "finetune", "plain")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _normalised(name: str) -> str:
    name = " ".join(name.replace("-", " ").split()).upper()
    return name.removeprefix("NVIDIA ")


GPU_ROWS = {_normalised(name): row for name, row in GPU_NAMES.items()}


def gpu_peak_tflops(device_name: str, precision: str, tf32: bool) -> tuple[str, float] | None:
    """(table row, dense peak TFLOP/s) of a GPU by its exact name, for the training precision (fp32: the TF32
    tensor-core peak only with train.tf32 on); None for a GPU not in the table."""
    row = GPU_ROWS.get(_normalised(device_name))
    if row is None:
        return None
    kind = "tf32" if precision == "fp32" and tf32 else precision
    return f"{row} {kind}", GPU_PEAK_TFLOPS[row][kind]


def peak_tflops(device: torch.device, precision: str, tf32: bool, override: float | None) -> tuple[str, float] | None:
    if override:
        return "--peak_tflops", override
    if device.type != "cuda":
        return None
    return gpu_peak_tflops(torch.cuda.get_device_name(device), precision, tf32)


def benchmark_overrides(run_dir: Path, steps: int, log_every: int) -> list[str]:
    """What every benchmarked run sets: its own directory, its length, and no sampling, export or saves between."""
    return [
        f"run.dir={run_dir}", f"train.steps={steps}", f"run.log_every={log_every}", "run.ckpt_every=1000000000",
        "run.sample_every=0", "run.export=false", "run.progress=false", "eval.every=0",
    ]  # fmt: skip


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int:
    """GPU: the allocator's peak since the last reset. CPU: the process's peak resident set (whole lifetime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trainer_intervals(config: str | None, overrides: list[str], run_dir: Path, steps: int, log_every: int) -> list:
    """Runs the trainer; returns rank 0's logged intervals (empty on other ranks)."""
    cfg = load_config(config, [*overrides, *benchmark_overrides(run_dir, steps, log_every)])
    train(cfg, overwrite=True)
    intervals = read_jsonl(run_dir / "metrics.jsonl") if dist.get_rank() == 0 else []
    distributed.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)  # the final checkpoint is not needed
    return intervals


class PlainLoop:
    """DiT's train.py step on batches already in memory: forward, loss, backward, AdamW, EMA."""

    def __init__(self, cfg: Config, device: torch.device, world_size: int):
        self.family = load_family(cfg)
        self.family.place_frozen(device)
        sources = open_sources(cfg, self.family)
        planner = build_planner(cfg, self.family, sources)
        accumulation = gradient_accumulation_steps(cfg, world_size)
        rank = dist.get_rank()
        slots = [
            slot_ids(rank=rank, micro_step=m, world_size=world_size, accumulation_steps=accumulation,
                     micro_batch_size=cfg.train.micro_batch_size)
            for m in range(accumulation)
        ]  # fmt: skip
        loader = StepLoader(planner, sources, slots, self.family.condition_fields)
        self.batches = [batch.to(device) for batch in loader.get(0)]
        loader.close()
        self.schedule = NoiseSchedule(self.family.betas())
        self.model = self.family.denoiser.to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)  # fmt: skip
        self.ema = [p.detach().float().clone() for p in self.params]
        self.ema_decay, self.device = o.ema_decay, device
        self.bf16 = cfg.train.precision == "bf16"
        device_ids = [device] if device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids) if world_size > 1 else None

    def micro_step(self, batch, model: torch.nn.Module) -> torch.Tensor:
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            x_t = self.schedule.add_noise(batch.x0, batch.noise, batch.t)
            condition = self.family.condition(batch.condition, batch.null_condition)
            output = self.family.predict(model, x_t, batch.t, condition)
        loss = diffusion_loss(output.float(), batch.x0, x_t, batch.noise, batch.t, self.schedule).mean()
        (loss / len(self.batches)).backward()
        return loss

    def step(self) -> None:
        model = self.ddp or self.model
        for i, batch in enumerate(self.batches):
            last = i == len(self.batches) - 1
            if self.ddp is not None and not last:
                with self.ddp.no_sync():
                    self.micro_step(batch, model)
            else:
                self.micro_step(batch, model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1.0 - self.ema_decay)

    def flops_per_step(self) -> int:
        """Forward and backward FLOPs of this rank's micro-batches in one step (no optimizer step)."""
        counter = FlopCounterMode(display=False)
        with counter:
            self.micro_step(self.batches[0], self.model)
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() * len(self.batches)

    def teacher_flops_per_step(self) -> int:
        """FLOPs that KD adds to a step of this rank: the frozen teacher's forward on the rank's retention slots
        (the same slots as the bank's; the teacher has the student's architecture, so the student stands in)."""
        batch = self.batches[0]
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            x_t = self.schedule.add_noise(batch.x0, batch.noise, batch.t)
            self.family.predict(self.model, x_t, batch.t, self.family.condition(batch.condition, batch.null_condition))
        retention_slots = sum(int((b.ids[:, 1] == RETENTION).sum()) for b in self.batches)
        return counter.get_total_flops() * retention_slots // len(batch.t)

    def interval_seconds(self, steps: int, log_every: int) -> list[float]:
        """Seconds per step of each interval of `log_every` steps."""
        times = []
        for _ in range(steps // log_every):
            begin = time.perf_counter()
            for _ in range(log_every):
                self.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append((time.perf_counter() - begin) / log_every)
        return times


def read_host_reads(path: Path) -> dict | None:
    """Median reads per step on steps that neither log nor save, and on log steps, by origin."""
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    plain = [r for r in rows if not r["logged"] and not r["saved"]]
    logged = [r for r in rows if r["logged"] and not r["saved"]]

    def median(rows: list[dict], key: str | None = None) -> float | None:
        values = [r["total"] if key is None else r["by_origin"].get(key, 0) for r in rows]
        return statistics.median(values) if values else None

    origins = sorted({k for r in rows for k in r["by_origin"]})
    return {"per_step": median(plain), "per_log_step": median(logged),
            "by_origin": {k: median(plain, k) for k in origins}}  # fmt: skip


def planner_milliseconds(cfg: Config, global_batch_size: int = 4096, repeats: int = 20) -> float:
    """Median time to plan one global step of `global_batch_size` slots (all of them, on one rank)."""
    family = load_family(cfg)
    cfg.train.global_batch_size = global_batch_size
    planner = build_planner(cfg, family, open_sources(cfg, family))
    times = []
    for step in range(repeats):
        begin = time.perf_counter()
        planner.plan(step)
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1000


def work_dir(requested: str | None, run_dir: str = "runs") -> Path:
    """The folder of the benchmark's runs and data: `requested`, else `<run_dir>/benchmark` (the config's run.dir),
    on the file system the job's nodes share, where a temporary folder would be node-local. Rank 0's path goes to
    every rank (relative paths resolve against its working directory)."""
    chosen = [str(Path(requested or Path(run_dir) / "benchmark").resolve())]
    dist.broadcast_object_list(chosen, src=0)
    Path(chosen[0]).mkdir(parents=True, exist_ok=True)
    return Path(chosen[0])


def measured_variants(config: str | None, overrides: list[str]) -> tuple[tuple[str, ...], str | None]:
    """Every variant, but KD where the config refuses it (ZeRO-3, no retention slots): (variants, why not KD)."""
    try:
        load_config(config, [*overrides, *KD])
    except ConfigError as err:
        return tuple(v for v in VARIANTS if v != "kd"), str(err)
    return VARIANTS, None


def measure(config: str | None, overrides: list[str], *, steps: int, log_every: int, warmup_intervals: int,
            rounds: int, peak_override: float | None, workdir: Path) -> dict:  # fmt: skip
    """Runs every variant `rounds` times, alternating; returns the figures (on rank 0; other ranks get theirs)."""
    rank, world_size, device = distributed.init()
    cfg = load_config(config, [*overrides, *benchmark_overrides(workdir / "probe", steps, log_every)])
    cfg = with_micro_batch(cfg, world_size)  # the number `auto` means on this world size, for the plain loop
    probe = PlainLoop(cfg, device, world_size)
    flops = probe.flops_per_step()
    variant_flops = {v: flops for v in VARIANTS} | {"kd": flops + probe.teacher_flops_per_step()}
    del probe
    variants, kd_refused = measured_variants(config, overrides)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    wait: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, int] = {v: 0 for v in variants}
    batch = cfg.train.global_batch_size
    for repeat in range(rounds):
        for variant in variants:
            _reset_peak(device)  # each variant builds its model afresh, so its peak is its own
            if variant == "plain":
                times = PlainLoop(cfg, device, world_size).interval_seconds(steps, log_every)
                seconds[variant] += times[warmup_intervals:]
            else:
                extra = VARIANT_OVERRIDES[variant]
                rows = trainer_intervals(config, [*overrides, *extra], workdir / f"{variant}{repeat}", steps, log_every)
                seconds[variant] += [batch / r["images_per_second"] for r in rows[warmup_intervals:]]
                wait[variant] += [r["time/data_wait_fraction"] for r in rows[warmup_intervals:]]
            peaks[variant] = max(peaks[variant], _peak_bytes(device))
    # One more run counts the host reads of every step (the counter slows steps, so not in the timed runs).
    reads_dir = workdir / "host_reads"
    counted = [*overrides, "debug.count_host_reads=true"]
    # Six steps logging every third: steps 1, 2, 4 and 5 neither log nor save.
    counted_cfg = load_config(config, [*counted, *benchmark_overrides(reads_dir, 6, 3)])
    train(counted_cfg, overwrite=True)
    reads = read_host_reads(reads_dir / "host_reads" / "rank_00000.jsonl") if rank == 0 else None
    all_peaks = [None] * world_size
    dist.all_gather_object(all_peaks, peaks)
    if rank != 0:
        return {}
    step_s = {v: statistics.median(s) for v, s in seconds.items()}
    peak_row, peak = peak_tflops(device, cfg.train.precision, cfg.train.tf32, peak_override) or (None, None)
    achieved = {v: variant_flops[v] / step_s[v] / 1e12 for v in variants}
    return {
        "config": config, "overrides": overrides, "device": device_name(device), "world_size": world_size,
        "global_batch_size": batch, "micro_batch_size": cfg.train.micro_batch_size,
        "precision": cfg.train.precision, "zero_stage": cfg.train.zero_stage,
        "steps_per_run": steps, "log_every": log_every, "warmup_intervals": warmup_intervals, "rounds": rounds,
        "step_ms": {v: s * 1000 for v, s in step_s.items()},
        "images_per_second_per_gpu": {v: batch / s / world_size for v, s in step_s.items()},
        "flops_per_step_per_rank": flops, "tflops_per_gpu": achieved, "peak_tflops": peak,
        "peak_source": peak_row,
        "flops_ratio_kd_over_difftune": variant_flops["kd"] / flops, "kd_not_measured": kd_refused,
        "mfu": {v: a / peak for v, a in achieved.items()} if peak else None,
        "steps_per_second": {v: 1.0 / s for v, s in step_s.items()},
        "peak_memory_gib_per_rank": {v: [p[v] / 2**30 for p in all_peaks] for v in variants},
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
        "process peak RSS (ru_maxrss, whole process lifetime, libraries included)",
        "data_wait_share": {v: statistics.median(w) for v, w in wait.items() if w},
        "host_reads": reads,
        "ratio_difftune_over_finetune": step_s["difftune"] / step_s["finetune"],
        "ratio_difftune_over_plain": step_s["difftune"] / step_s["plain"],
        "ratio_finetune_over_plain": step_s["finetune"] / step_s["plain"],
        # KD's cost as the rebuttal states it: steps/s of Diff-Tuning with the bank over that with KD (2.1 / 1.34).
        "ratio_kd_over_difftune": step_s["kd"] / step_s["difftune"] if "kd" in step_s else None,
        "ratio_kd_over_finetune": step_s["kd"] / step_s["finetune"] if "kd" in step_s else None,
        "planner_ms_at_global_batch_4096": planner_milliseconds(cfg),
        "load": os.getloadavg(),
    }  # fmt: skip


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def format_report(result: dict) -> str:
    """The table rank 0 prints."""
    r = result

    def row(label: str, values: dict | None, fmt: str) -> str:
        cells = [format(values[v], fmt) if values and values.get(v) is not None else "n/a" for v in VARIANTS]
        return f"{label:34}" + "".join(f"{c:>12}" for c in cells)

    peaks = {v: max(gib) for v, gib in r["peak_memory_gib_per_rank"].items()}
    reads = r["host_reads"]
    lines = [
        f"{r['config'] or 'default'} {' '.join(r['overrides'])}".strip(),
        f"device {r['device']}, {r['world_size']} rank(s), global batch {r['global_batch_size']}, micro-batch "
        f"{r['micro_batch_size']}, {r['precision']}, ZeRO-{r['zero_stage']}; load average {r['load'][0]:.1f}",
        f"{'':34}" + "".join(f"{v:>12}" for v in VARIANTS),
        row("step time, ms (median)", r["step_ms"], ".1f"),
        row("steps/s", r["steps_per_second"], ".3f"),
        row("images/s per GPU", r["images_per_second_per_gpu"], ".1f"),
        row("achieved TFLOP/s per GPU", r["tflops_per_gpu"], ".3f"),
        row("MFU" + ("" if r["peak_tflops"] else " (unknown: no peak for this GPU)"), r["mfu"], ".1%"),
        row("peak memory, GiB (max over ranks)", peaks, ".2f"),
        row("data-wait share", r["data_wait_share"], ".2%"),
        f"{'host reads per step (no log/save)':34}"
        + (f"{reads['per_step']!s:>12} (log steps: {reads['per_log_step']}; by origin {reads['by_origin']})"
           if reads else f"{'n/a':>12}"),
        f"peak memory is {r['peak_memory_kind']}",
        f"FLOPs per step per rank {r['flops_per_step_per_rank'] / 1e9:.2f} GFLOP (torch.utils.flop_counter); "
        + (f"peak {r['peak_tflops']} TFLOP/s ({r['peak_source']}, dense)" if r["peak_tflops"] else
         f"peak unknown for {r['device']}: MFU not reported; pass --peak_tflops with its dense peak"),
        f"step-time ratio Diff-Tuning / fine-tuning      {r['ratio_difftune_over_finetune']:.3f}",
        f"step-time ratio Diff-Tuning / minimal loop     {r['ratio_difftune_over_plain']:.3f}",
        f"step-time ratio fine-tuning / minimal loop     {r['ratio_finetune_over_plain']:.3f}",
        *(
            [f"step-time ratio KD / Diff-Tuning (bank)       {r['ratio_kd_over_difftune']:.3f}  (rebuttal, A100: "
             "2.1 / 1.34 = 1.567)",
             f"step-time ratio KD / fine-tuning              {r['ratio_kd_over_finetune']:.3f}",
             f"FLOPs ratio KD / Diff-Tuning (bank)           {r['flops_ratio_kd_over_difftune']:.3f}  (the teacher's "
             "forward on the retention slots; TFLOP/s and MFU of KD count it)"]
            if r["ratio_kd_over_difftune"] is not None else [f"KD: not measured: {r['kd_not_measured']}"]
        ),
        f"planner, one global step of 4096 slots         {r['planner_ms_at_global_batch_4096']:.2f} ms",
    ]  # fmt: skip
    return "\n".join(lines)
