"""The runner of the GPU check (trainer/benchmark/gpu_check.py holds the checks): each check in its own thread with a
deadline, a few at a time, the timed ones alone at the end, and one table of the rows.

A check that fails, raises or runs out of time becomes its row's FAIL, never the end of the command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OK, FAIL, SKIP = "ok", "FAIL", "skip"
TOTAL_BUDGET_S = 470  # the whole command, on the GPU: under 8 minutes with the table written
CPU_SLOWDOWN = 3  # per-check budgets on the CPU (tiny models, but a few cores shared by every process)


class CheckFailed(Exception):
    """The check ran and found something wrong; the message says what, `figures` what it measured."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


@dataclass
class Row:
    check: str
    status: str
    seconds: float
    budget_s: float
    figures: dict = field(default_factory=dict)
    detail: str = ""


@dataclass(frozen=True)
class Check:
    name: str
    budget_s: float  # on the GPU; CPU_SLOWDOWN times this on the CPU
    run: Callable[[Context, float], dict]  # (context, deadline on time.monotonic) -> figures
    plan: Callable[[Context], str]  # what it runs, for --dry and the JSON
    cpu_skip: str = ""  # why it does not run on the CPU; empty: it runs there with tiny sizes
    dry: bool = False  # cheap enough to run in --dry
    alone: bool = False  # timings: after the others, by itself
    uses: tuple[str, ...] = ()  # the assets it trains on (Context.assets)


def expect(condition: bool, message: str, figures: dict) -> None:
    if not condition:
        raise CheckFailed(message, figures)


def tail(text: str | bytes | None, lines: int = 3) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else (text or "")
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-400:]


class Context:
    """What the checks share: the device, the work folder, the tiny models made once, the rows done so far."""

    def __init__(self, device: str, root: Path, builders: dict[str, Callable[[Path], dict[str, Path]]]):
        self.device, self.root, self.builders = device, root, builders
        self._assets: dict[str, dict[str, Path] | BaseException] = {}
        self._locks = {name: threading.Lock() for name in builders}  # one each: XL/2's minute holds up no tiny run
        self.futures: dict[str, Future] = {}

    def assets(self, name: str) -> dict[str, Path]:
        """Folders made once, by the first check that asks."""
        with self._locks[name]:
            if name not in self._assets:
                try:
                    self._assets[name] = self.builders[name](self.root / name)
                except Exception as err:  # every check that needs them fails with this reason
                    self._assets[name] = err
            found = self._assets[name]
        if isinstance(found, BaseException):
            raise CheckFailed(f"could not build the {name} assets: {found}")
        return found

    def tiny(self) -> dict[str, Path]:
        return self.assets("tiny")

    def tiny_sd(self) -> dict[str, Path]:
        return self.assets("tiny_sd")

    def dit_xl2(self) -> dict[str, Path]:
        return self.assets("dit_xl2")

    def row(self, name: str, until: float) -> Row | None:
        """The row of an earlier check (waiting for it), or None where it is not run."""
        future = self.futures.get(name)
        try:
            return future.result(timeout=max(0.0, until - time.monotonic())) if future else None
        except FutureTimeout:  # still running at this check's deadline
            return None

    def launch(self, script: str, args: list[str], until: float) -> subprocess.CompletedProcess:
        """`launch/<script>` in its own process, as the tests start it, killed at the deadline."""
        from tests.conftest import free_port, run_entry

        left = until - time.monotonic()
        if left < 1:
            raise CheckFailed(f"no time left in the check's budget to start launch/{script}")
        try:  # a port each: several single-process runs at a time would otherwise share a pid-derived one
            proc = run_entry(script, args, timeout=left, env={"MASTER_PORT": str(free_port())})
        except subprocess.TimeoutExpired as err:
            raise CheckFailed(f"launch/{script} ran past the check's budget: {tail(err.stderr)}") from None
        if proc.returncode:
            raise CheckFailed(f"launch/{script} exited {proc.returncode}: {tail(proc.stderr)}")
        return proc


# --- running them -------------------------------------------------------------------------------------------------
def run_one(ctx: Context, check: Check, budget_s: float, phase_end: float) -> Row:
    start = time.monotonic()
    until = min(start + budget_s, phase_end)
    if until - start < 5:
        return Row(check.name, SKIP, 0.0, budget_s, detail="no time left in the overall budget")
    try:
        figures, status, detail = check.run(ctx, until), OK, ""
    except CheckFailed as err:
        figures, status, detail = err.figures, FAIL, str(err)
    except Exception as err:  # a bug or a surprise in a check is its row's failure, not the command's
        figures, status, detail = {}, FAIL, f"{type(err).__name__}: {err}"
    return Row(check.name, status, round(time.monotonic() - start, 1), budget_s, figures, detail)


def run_checks(
    checks: Sequence[Check], builders: dict, device: str, *, dry: bool = False, only: set[str] | None = None,
    root: Path | None = None, total_budget_s: float | None = None, jobs: int | None = None,
) -> dict:  # fmt: skip
    """Runs `checks` (their models made by `builders`); returns the report (the rows in their order, as JSON-ready
    dicts)."""
    unknown = (only or set()) - {c.name for c in checks}
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; the checks are {[c.name for c in checks]}")
    os.environ["DIFFTUNE_TEST_DEVICE"] = device  # tests.conftest's helpers launch runs on this device
    if device == "cuda":
        os.environ.pop("DS_ACCELERATOR", None)
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"
    scale = 1 if device == "cuda" else CPU_SLOWDOWN
    total_budget_s = total_budget_s or TOTAL_BUDGET_S * scale
    jobs = jobs or (4 if device == "cuda" else 1)  # tiny runs share one GPU; a few CPU cores run one at a time
    kept = root is not None
    root = Path(root or tempfile.mkdtemp(prefix="difftune-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    ctx, start = Context(device, root, builders), time.monotonic()
    rows: dict[str, Row] = {}
    to_run = []
    # Without a GPU the launched runs would quietly train on the CPU: only the environment row says why not.
    no_gpu = device == "cuda" and not torch.cuda.is_available()
    for check in checks:
        budget = check.budget_s * scale
        if only and check.name not in only:
            rows[check.name] = Row(check.name, SKIP, 0.0, budget, detail="not selected (--only)")
        elif no_gpu and check.name != "environment":
            rows[check.name] = Row(
                check.name,
                SKIP,
                0.0,
                budget,
                {"plan": check.plan(ctx)},
                "no CUDA device here (see environment); --device cpu or --dry run on the CPU",
            )
        elif device == "cpu" and check.cpu_skip:
            rows[check.name] = Row(check.name, SKIP, 0.0, budget, {"plan": check.plan(ctx)},
                                   f"CPU: {check.cpu_skip}")  # fmt: skip
        elif dry and not check.dry:
            rows[check.name] = Row(check.name, SKIP, 0.0, budget, {"plan": check.plan(ctx)},
                                   "dry run: planned, not run")  # fmt: skip
        else:
            to_run.append((check, budget))
    try:
        # The tiny models first, here: their builders set torch's global seed, as XL/2's does later in a thread.
        for name in ("tiny", "tiny_sd"):
            if any(name in check.uses for check, _ in to_run):
                try:
                    ctx.assets(name)
                except CheckFailed:
                    pass  # the checks that use them fail with the reason
        shared = [(c, b) for c, b in to_run if not c.alone]
        alone = [(c, b) for c, b in to_run if c.alone]
        # The shared phase leaves the timed checks their budgets; then each of those gets what is left, up to its own.
        shared_end = start + total_budget_s - sum(b for _, b in alone)
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="gpu-check") as pool:
            for check, budget in shared:  # in checks' order: a row that a check reads is submitted before it
                ctx.futures[check.name] = pool.submit(run_one, ctx, check, budget, shared_end)
            for name, future in ctx.futures.items():
                rows[name] = future.result()
        for check, budget in alone:
            rows[check.name] = run_one(ctx, check, budget, start + total_budget_s)
    finally:
        if not kept:
            shutil.rmtree(root, ignore_errors=True)
    ordered = [rows[c.name] for c in checks]
    return {"device": device, "dry": dry, "budget_s": total_budget_s, "total_s": round(time.monotonic() - start, 1),
            "failed": sum(r.status == FAIL for r in ordered), "rows": [asdict(r) for r in ordered]}  # fmt: skip


def short(value, width: int = 60) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {short(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, list):
        text = "[" + ", ".join(short(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(report: dict, figures_width: int = 110) -> str:
    """One line per check: name, status, seconds, then its figures (a FAIL's or skip's reason first)."""
    lines = [f"GPU check on {report['device']}{' (dry)' if report['dry'] else ''}: {report['failed']} failed, "
             f"{report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget",
             f"{'check':28} {'status':6} {'seconds':>8}  figures"]  # fmt: skip
    for row in report["rows"]:
        figures = {k: v for k, v in row["figures"].items() if k != "plan"}
        cells = ([row["detail"]] if row["detail"] else []) + [f"{k}={short(v)}" for k, v in figures.items()]
        text = "; ".join(cells)
        text = text if len(text) <= figures_width else text[: figures_width - 3] + "..."
        lines.append(f"{row['check']:28} {row['status']:6} {row['seconds']:8.1f}  {text}")
    planned = [row for row in report["rows"] if "plan" in row["figures"]]
    if planned:  # the commands of the checks that did not run, whole
        lines += ["not run here:"] + [f"  {row['check']}: {row['figures']['plan']}" for row in planned]
    return "\n".join(lines)
