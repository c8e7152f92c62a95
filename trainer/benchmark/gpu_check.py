"""The GPU check (launch/gpu_check.py): one command, one table, for a GPU that is lent for minutes.

Rows: the suite's GPU-able tests on CUDA; tiny bf16 runs under ZeRO-2 and ZeRO-3 with decoding workers, each
rewound to its middle checkpoint and resumed to the same end; the non-finite skip; KD retention; SD 1.5 +
ControlNet with convergence tracking; `train.compile` under the DeepSpeed engine; device syncs per step and the
benchmark of a random DiT-XL/2 (images/s, MFU, peak memory).

Every check launches the real entry points (launch/train.py, launch/benchmark.py, pytest) as processes with a
deadline, so that a check that fails or hangs becomes a row, not the end of the command. The checks run a few at a
time (tiny models leave one GPU mostly idle, and the whole must fit the minutes a GPU is lent for), except the
benchmark, whose figures are timings: it runs alone, after the others.

`device="cpu"` runs what the CPU can, tiny (rows that need CUDA say so); `dry` plans every check and runs only the
cheap ones (tests/benchmark/test_gpu_check.py runs it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from trainer.benchmark import gpu_runner
from trainer.benchmark.gpu_runner import (  # noqa: F401 (re-exported for launch/gpu_check.py and the tests)
    CPU_SLOWDOWN,
    FAIL,
    OK,
    ROOT,
    SKIP,
    TOTAL_BUDGET_S,
    Check,
    CheckFailed,
    Context,
    Row,
    expect,
    format_table,
    run_one,
    tail,
)

# Tests that train through the device DeepSpeed picks, on one rank, and compare only runs on that same device
# (golden losses and thresholds measured on the CPU stay out). Multi-rank tests in these files skip themselves
# on one GPU (tests/conftest.py run_entry).
PYTEST_SELECTION = (
    "tests/core/test_host_reads.py",
    "tests/models/test_export.py",
    "tests/jobs/test_generate_bank.py::test_bank_contents_and_preview",
    "tests/jobs/test_generate_bank.py::test_training_reads_the_bank",
    "tests/jobs/test_sd_jobs.py::test_training_on_the_jobs_outputs_tracks_convergence",
)
BF16_WORKERS = ("train.precision=bf16", "data.num_workers=2")
RESUMABLE = ("train.steps=6", "run.ckpt_every=3", "run.keep_last=0")  # rewound to step 3, resumed to step 6
NAN_SKIP = ("train.precision=bf16", "train.zero_stage=2", "train.steps=5", "run.ckpt_every=1", "run.keep_last=0",
            "debug.nan_at_step=2", "optim.warmup_steps=10", "run.export=false")  # fmt: skip
KD = ("train.precision=bf16", "train.zero_stage=2", "method.retention=kd", "data.bank=null", "train.steps=4",
      "run.export=false")  # fmt: skip
SD_CONVERGENCE = ("train.precision=bf16", "train.zero_stage=2", "train.steps=4", "eval.every=2", "run.export=false")
COMPILED = (*BF16_WORKERS, "train.zero_stage=2", *RESUMABLE, "train.compile=true")  # the ZeRO-2 run, compiled
BENCHMARK_ARGS = ("--steps", "12", "--log_every", "4", "--warmup_intervals", "1", "--rounds", "1")
CPU_BENCHMARK = ("train.global_batch_size=8", "train.micro_batch_size=8")  # the small DiT, quick on a few cores
# Rounding-level differences only: GPU kernels that are not bitwise deterministic (attention's backward) and
# bf16 raw weights, where a master weight that moved by 1e-7 can flip one bf16 step (2^-7 relative at most). A
# resume that loses state (optimizer moments, the EMA, the data position) moves weights by about lr = 1e-3 per
# step and losses by far more.
RESUME_LOSS_RTOL = 1e-3
RAW_RTOL, EMA_RTOL, WEIGHT_ATOL = 2**-7, 1e-4, 1e-5
COMPILE_LOSS_RTOL = 2e-2  # inductor's fused bf16 kernels round differently; a wrong compiled block is far off
SYNC_WARNING = "called a synchronizing CUDA operation"
SYNC_RUN_STEPS = (2, 6)  # two runs that differ only by their quiet steps


def make_tiny_set(root: Path) -> dict[str, Path]:
    """The tests' `tiny` fixture: a tiny pixel DiT and its target and bank shards."""
    from tests.conftest import make_tiny_set  # the test helpers: imported when a check needs them

    return make_tiny_set(root)


def make_tiny_sd_set(root: Path) -> dict[str, Path]:
    """The tests' `tiny_sd` fixture: a tiny SD 1.5 folder and its target and bank shards."""
    from tests.tiny_sd import make_tiny_sd_set

    return make_tiny_sd_set(root)


def make_dit_xl2_set(root: Path) -> dict[str, Path]:
    """A random DiT-XL/2 (~3 GB of weights) and latent target and bank shards for it (256 px: 4x32x32)."""
    from tests.tiny import make_shards
    from trainer.benchmark.memory_check import make_random_dit_xl2

    return {
        "pretrained": make_random_dit_xl2(root / "pretrained"),
        "target": make_shards(root / "target", 256, shape=(4, 32, 32), num_classes=2, per_shard=128),
        "bank": make_shards(root / "bank", 256, shape=(4, 32, 32), num_classes=2, per_shard=128, seed=1),
    }


BUILDERS = {"tiny": make_tiny_set, "tiny_sd": make_tiny_sd_set, "dit_xl2": make_dit_xl2_set}


def xl2_overrides(xl2: dict[str, Path]) -> list[str]:
    """The paper's preset on one GPU: global batch 32 = micro-batch 32."""
    return [f"model.pretrained={xl2['pretrained']}", "model.num_classes=0", f"data.target={xl2['target']}",
            f"data.bank={xl2['bank']}", "data.verify=size", "train.global_batch_size=32",
            "train.micro_batch_size=32"]  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path, key: str = "loss/total") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


def exported(run_dir: Path, which: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted((run_dir / "export" / which).rglob("*.safetensors")):
        state |= {f"{path.parent.name}/{k}": v.float() for k, v in load_file(path).items()}
    return state


def max_relative(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=math.inf)


def weight_excess(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> tuple[float, float]:
    """(max |a - b|, max of |a - b| / (WEIGHT_ATOL + rtol |b|)): the second is <= 1 where a matches b."""
    diff = excess = 0.0
    for key in b:
        delta = (a[key] - b[key]).abs()
        diff = max(diff, float(delta.max()))
        excess = max(excess, float((delta / (WEIGHT_ATOL + rtol * b[key].abs())).max()))
    return diff, excess


# --- the checks ---------------------------------------------------------------------------------------------------
def check_environment(ctx: Context, until: float) -> dict:
    figures = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "deepspeed": metadata.version("deepspeed")}  # fmt: skip
    if ctx.device == "cpu":
        return figures | {"device": f"cpu ({os.cpu_count()} cores)", "deepspeed_accelerator": "cpu (DS_ACCELERATOR)"}
    expect(torch.cuda.is_available(), "torch sees no CUDA device (a CPU-only torch, or no driver)", figures)
    props = torch.cuda.get_device_properties(0)
    figures |= {"gpu": props.name, "gpus_visible": torch.cuda.device_count(),
                "capability": f"{props.major}.{props.minor}",
                "gpu_memory_gib": round(props.total_memory / 2**30, 1)}  # fmt: skip
    # What DeepSpeed picks in a fresh process with DS_ACCELERATOR unset, as every launched run here does.
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    probe = "from deepspeed.accelerator import get_accelerator; print(get_accelerator().device_name())"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          timeout=max(1.0, until - time.monotonic()))  # fmt: skip
    picked = proc.stdout.strip().splitlines()
    figures["deepspeed_accelerator"] = picked[-1] if picked else tail(proc.stderr)
    expect(figures["deepspeed_accelerator"] == "cuda", "DeepSpeed does not pick CUDA", figures)
    return figures


def pytest_command(ctx: Context) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=-ra", "--basetemp",
            str(ctx.root / "pytest"), *PYTEST_SELECTION]  # fmt: skip


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("3 passed, 2 skipped in 40.1s")."""
    lines = reversed(output.splitlines())
    summary = next((line for line in lines if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)
    counts = {word: int(n) for n, word in found}
    if "error" in counts:
        counts["errors"] = counts.pop("error")
    return counts


def check_pytest(ctx: Context, until: float) -> dict:
    env = {**os.environ, "DIFFTUNE_TEST_DEVICE": "cuda", "PYTHONPATH": str(ROOT)}
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed picks CUDA itself, as for users
    # A session of its own: at the deadline the runs its tests launched go too, not on into the benchmark.
    proc = subprocess.Popen(pytest_command(ctx), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=max(1.0, until - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    counts = pytest_counts(output)
    header = next((line for line in output.splitlines() if line.startswith("test device:")), "test device: ?")
    failed = [line.split()[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    figures = {**counts, "device": header.removeprefix("test device: "), "failed_tests": failed[:5]}
    expect(not timed_out, "pytest ran past the check's budget", figures)
    expect(header.startswith("test device: cuda"), f"the tests did not run on CUDA: {tail(output, 2)}", figures)
    expect(not counts.get("failed") and not counts.get("errors") and counts.get("passed", 0) > 0,
           f"pytest: {tail(output, 1)}", figures)  # fmt: skip
    return figures


def check_zero_resume(stage: int) -> Callable[[Context, float], dict]:
    def run(ctx: Context, until: float) -> dict:
        from tests.conftest import copy_as_stopped_after, train_args

        tiny, overrides = ctx.tiny(), (*BF16_WORKERS, f"train.zero_stage={stage}", *RESUMABLE)
        straight, resumed = ctx.root / f"zero{stage}" / "straight", ctx.root / f"zero{stage}" / "resumed"
        ctx.launch("train.py", train_args(tiny, straight, *overrides), until)
        rows = read_metrics(straight)
        speeds = [m["images_per_second"] for m in rows]
        figures = {"losses": [m["loss/total"] for m in rows],
                   "skipped_steps": rows[-1]["skipped_steps"] if rows else None,
                   "images_per_second": statistics.median(speeds) if speeds else None}  # fmt: skip
        expect(len(rows) == 6 and all(map(math.isfinite, figures["losses"])), "not 6 finite losses", figures)
        expect(figures["skipped_steps"] == 0, "steps were skipped in a run with finite losses", figures)
        copy_as_stopped_after(straight, resumed, 3)
        ctx.launch("train.py", train_args(tiny, resumed, *overrides) + ["--resume"], until)
        a, b = losses(resumed), losses(straight)
        expect(sorted(a) == sorted(b), f"the resumed run logged steps {sorted(a)}", figures)
        later = [s for s in sorted(b) if s > 3]
        figures["resume_loss_max_rel_diff"] = max_relative([a[s] for s in later], [b[s] for s in later])
        excess = 0.0
        for which, rtol in (("raw", RAW_RTOL), ("ema", EMA_RTOL)):
            wa, wb = exported(resumed, which), exported(straight, which)
            expect(wa.keys() == wb.keys() and bool(wb), f"the {which} exports hold other tensors", figures)
            figures[f"resume_{which}_max_abs_diff"], excess_which = weight_excess(wa, wb, rtol)
            excess = max(excess, excess_which)
        figures["resume_bitwise"] = figures["resume_loss_max_rel_diff"] == 0 and excess == 0
        expect(figures["resume_loss_max_rel_diff"] <= RESUME_LOSS_RTOL and excess <= 1,
               "the resumed run ends elsewhere than the straight one", figures)  # fmt: skip
        return figures

    return run


def check_nan_skip(ctx: Context, until: float) -> dict:
    from tests.conftest import train_args

    run = ctx.root / "nan_skip"
    ctx.launch("train.py", train_args(ctx.tiny(), run, *NAN_SKIP), until)

    def weights(step: int) -> dict[str, torch.Tensor]:
        path = run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["module"]

    before, after, later = weights(2), weights(3), weights(4)
    figures = {"skipped_steps": [m["skipped_steps"] for m in read_metrics(run)],
               "step3_changed_nothing": all(torch.equal(before[k], after[k]) for k in before),
               "step4_trained": any(not torch.equal(after[k], later[k]) for k in after)}  # fmt: skip
    expect(figures["skipped_steps"] == [0, 0, 1, 1, 1], "step 3 (debug.nan_at_step=2) was not the one skipped", figures)
    expect(figures["step3_changed_nothing"] and figures["step4_trained"],
           "the skipped step changed weights, or training stopped after it", figures)  # fmt: skip
    return figures


def check_kd(ctx: Context, until: float) -> dict:
    from tests.conftest import train_args

    run = ctx.root / "kd"
    ctx.launch("train.py", train_args(ctx.tiny(), run, *KD), until)
    kd = losses(run, "loss/kd")
    figures = {"loss_kd": list(kd.values()), "loss_target": list(losses(run, "loss/target").values())}
    expect(sorted(kd) == [1, 2, 3, 4] and all(map(math.isfinite, kd.values())), "not 4 finite KD losses", figures)
    # Step 1's student is its teacher (a loss of 0 or rounding); it must move away from it afterwards.
    expect(all(kd[s] > 0 for s in (2, 3, 4)), "the KD loss stayed 0: the student never left its teacher", figures)
    return figures


def check_sd_convergence(ctx: Context, until: float) -> dict:
    from tests.tiny_sd import sd_train_args

    run = ctx.root / "sd_controlnet"
    ctx.launch("train.py", sd_train_args(ctx.tiny_sd(), run, *SD_CONVERGENCE), until)
    result = json.loads((run / "convergence.json").read_text())
    history = result["history"]
    figures = {"losses": list(losses(run).values()), "metric": result["metric"], "threshold": result["threshold"],
               "values": [h["value"] for h in history], "first_step": result["first_step"]}  # fmt: skip
    expect([h["step"] for h in history] == [2, 4], "convergence was not evaluated at steps 2 and 4", figures)
    expect(all(map(math.isfinite, figures["values"] + figures["losses"])), "non-finite losses or values", figures)
    return figures


def check_compile(ctx: Context, until: float) -> dict:
    from tests.conftest import train_args

    run = ctx.root / "compiled"
    ctx.launch("train.py", train_args(ctx.tiny(), run, *COMPILED), until)
    compiled = list(losses(run).values())
    figures = {"losses": compiled}
    expect(len(compiled) == 6 and all(map(math.isfinite, compiled)), "not 6 finite losses", figures)
    eager = ctx.row("zero2_bf16_resume", until)  # the same run, not compiled
    if eager is None or eager.status != OK:
        figures["vs_eager"] = "n/a: the ZeRO-2 row did not run or failed"
        return figures
    figures["max_rel_diff_vs_eager"] = max_relative(compiled, eager.figures["losses"])
    expect(figures["max_rel_diff_vs_eager"] <= COMPILE_LOSS_RTOL, "compiled losses differ from eager ones", figures)
    return figures


def check_device_syncs(ctx: Context, until: float) -> dict:
    out = ctx.root / "device_syncs.json"
    args = ["--count_syncs", str(out), "--config", "dit_xl2_paper", *xl2_overrides(ctx.dit_xl2())]
    ctx.launch("gpu_check.py", args, until)
    result = json.loads(out.read_text())
    return {"device_syncs_per_quiet_step": result["per_step"], "by_site": result["by_site"], "runs": result["runs"]}


def check_benchmark(ctx: Context, until: float) -> dict:
    out, work = ctx.root / "benchmark.json", ctx.root / "benchmark"
    args = ["--config", "dit_xl2_paper", *BENCHMARK_ARGS, "--workdir", str(work), "--out", str(out)]
    args += xl2_overrides(ctx.dit_xl2()) if ctx.device == "cuda" else list(CPU_BENCHMARK)
    ctx.launch("benchmark.py", args, until)
    r = json.loads(out.read_text())
    reads = r.get("host_reads") or {}
    return {
        "model": "random DiT-XL/2" if ctx.device == "cuda" else "the benchmark's small DiT", "device": r.get("device"),
        "images_per_second_per_gpu": r.get("images_per_second_per_gpu"),
        "mfu": r.get("mfu") or "n/a: no peak known for this device", "peak_tflops": r.get("peak_tflops"),
        "peak_memory_gib": {v: max(g) for v, g in r.get("peak_memory_gib_per_rank", {}).items()},
        "peak_memory_kind": r.get("peak_memory_kind"), "host_reads_per_quiet_step": reads.get("per_step"),
        "ratio_difftune_over_plain": r.get("ratio_difftune_over_plain"),
    }  # fmt: skip


def count_device_syncs(config: str, overrides: list[str], root: Path, steps: tuple[int, int] = SYNC_RUN_STEPS) -> dict:
    """Device syncs per quiet step, in this process: torch.cuda's sync debug mode warns at every synchronising
    CUDA call (a stream or device synchronize, a blocking copy), and the warnings are counted by file:line. Two runs
    that log and save only at their end differ by their extra quiet steps alone: set-up, the last step's log and
    save, and the teardown are the same in both, so the difference of the counts over the difference of the steps
    is the count of one quiet step. Syncs outside CUDA's runtime calls (NCCL waits) are not seen."""
    from trainer import distributed
    from trainer.config import load_config
    from trainer.loop import train

    distributed.init()
    counted: dict[int, Counter] = {}
    for n in steps:
        run_dir = root / f"steps_{n}"
        cfg = load_config(config, [*overrides, f"run.dir={run_dir}", f"train.steps={n}", f"run.log_every={n}",
                                   f"run.ckpt_every={n}", "run.sample_every=0", "run.export=false",
                                   "run.progress=false", "eval.every=0"])  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every occurrence, not one per site
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, overwrite=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counted[n] = Counter(
            f"{w.filename.rsplit('site-packages/', 1)[-1].removeprefix(str(ROOT) + '/')}:{w.lineno}"
            for w in caught if SYNC_WARNING in str(w.message)
        )  # fmt: skip
        shutil.rmtree(run_dir, ignore_errors=True)  # an XL/2 checkpoint is ~12 GB
    few, many = steps
    sites = counted[many] | counted[few]
    extra = {site: (counted[many][site] - counted[few][site]) / (many - few) for site in sites}
    return {"per_step": (sum(counted[many].values()) - sum(counted[few].values())) / (many - few),
            "by_site": {site: n for site, n in sorted(extra.items(), key=lambda kv: -abs(kv[1])) if n},
            "runs": {f"{n}_steps": sum(counted[n].values()) for n in steps}}  # fmt: skip


def launched(script: str, *args: str) -> str:
    return " ".join(["python", f"launch/{script}", *args])


def train_plan(config: str, *overrides: str) -> str:
    return launched("train.py", "--config", config, *overrides)


CHECKS = (
    Check("environment", 30, check_environment, lambda ctx: "torch, DeepSpeed and the device, in this process",
          dry=True),
    Check("pytest_cuda", 240, check_pytest,
          lambda ctx: "DIFFTUNE_TEST_DEVICE=cuda " + " ".join(pytest_command(ctx)[1:]),
          cpu_skip="the suite on the CPU is `make test`; this row runs its GPU-able tests on CUDA"),
    Check("device_syncs_dit_xl2", 180, check_device_syncs,
          lambda ctx: launched("gpu_check.py", "--count_syncs", "OUT", "--config", "dit_xl2_paper", "<random XL/2>")
          + f": runs of {SYNC_RUN_STEPS} steps under torch.cuda.set_sync_debug_mode('warn')",
          cpu_skip="torch.cuda.set_sync_debug_mode needs CUDA (and the CPU has no device to wait for)"),
    Check("zero2_bf16_resume", 150, check_zero_resume(2),
          lambda ctx: train_plan("tiny_cpu", *BF16_WORKERS, "train.zero_stage=2", *RESUMABLE)
          + "; rewound to step 3, --resume, compared", uses=("tiny",)),
    Check("compile_under_engine", 200, check_compile, lambda ctx: train_plan("tiny_cpu", *COMPILED),
          cpu_skip="inductor takes minutes on the CPU; tests/core/test_memory_knobs.py checks compiled blocks there",
          uses=("tiny",)),  # after zero2_bf16_resume, whose row it reads
    Check("zero3_bf16_resume", 150, check_zero_resume(3),
          lambda ctx: train_plan("tiny_cpu", *BF16_WORKERS, "train.zero_stage=3", *RESUMABLE)
          + "; rewound to step 3, --resume, compared", uses=("tiny",)),
    Check("sd_controlnet_convergence", 150, check_sd_convergence,
          lambda ctx: train_plan("tiny_sd_cpu", *SD_CONVERGENCE), uses=("tiny_sd",)),
    Check("nan_skip", 90, check_nan_skip, lambda ctx: train_plan("tiny_cpu", *NAN_SKIP), uses=("tiny",)),
    Check("kd_retention", 90, check_kd, lambda ctx: train_plan("tiny_cpu", *KD), uses=("tiny",)),
    Check("benchmark_dit_xl2", 200, check_benchmark,
          lambda ctx: launched("benchmark.py", "--config", "dit_xl2_paper", *BENCHMARK_ARGS,
                               *(["<random XL/2>"] if ctx.device == "cuda" else CPU_BENCHMARK)),
          alone=True),
)  # fmt: skip


def run_checks(device: str, **options) -> dict:
    """Every check of this module on `device` (gpu_runner.run_checks' options)."""
    return gpu_runner.run_checks(CHECKS, BUILDERS, device, **options)
