"""Check the trainer on one GPU in under 8 minutes: one table of checks (ok / FAIL / skip, seconds, figures).

`python launch/gpu_check.py --out gpu_check.json` on a machine with a CUDA GPU and PyPI's torch (`make env`):
the suite's GPU-able tests on CUDA, tiny bf16 runs under ZeRO-2 and ZeRO-3 with decoding workers resumed from
their middle checkpoint, the non-finite skip, KD retention, SD 1.5 + ControlNet with convergence tracking,
`train.compile` under the DeepSpeed engine, device syncs per step and the benchmark of a random DiT-XL/2
(images/s, MFU, peak memory). A check that fails or runs past its budget is a FAIL row; the exit status is 1
when a row FAILs.

`--device cpu`: what the CPU can run, tiny (the rows that need CUDA say so). `--dry`: every check planned with its
commands, only the cheap ones run on the CPU. `--only a,b`: those checks. `--workdir`: keep the runs there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import exit_process, run_guarded  # noqa: E402


def count_syncs(args) -> None:
    """A child of the device-sync check: counts in this process, writes JSON to `args.count_syncs`."""
    from trainer.benchmark.gpu_check import count_device_syncs

    out = Path(args.count_syncs)
    result = count_device_syncs(args.config, args.overrides, out.parent / "sync_runs")
    out.write_text(json.dumps(result, indent=2))


def check(args) -> int:
    from trainer.benchmark.gpu_check import format_table, run_checks

    only = set(args.only.split(",")) if args.only else None
    device = "cpu" if args.dry else args.device
    report = run_checks(device, dry=args.dry, only=only, root=Path(args.workdir) if args.workdir else None,
                        total_budget_s=args.budget_s, jobs=args.jobs)  # fmt: skip
    print(format_table(report), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 1 if report["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry", action="store_true", help="plan every check, run only the cheap ones (CPU)")
    parser.add_argument("--only", help="comma-separated check names")
    parser.add_argument("--out", help="write the table as JSON to this file")
    parser.add_argument("--workdir", help="keep the runs and models in this folder (default: a temporary one)")
    parser.add_argument("--budget_s", type=float, help="the whole command's budget (default: 470 s on CUDA)")
    parser.add_argument("--jobs", type=int, help="checks at a time (default: 4 on CUDA, 1 on the CPU)")
    parser.add_argument("--count_syncs", help=argparse.SUPPRESS)  # the device-sync check's child process
    parser.add_argument("--config", default="dit_xl2_paper", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_syncs:
        return run_guarded(lambda: count_syncs(args))
    status = [0]
    guarded = run_guarded(lambda: status.__setitem__(0, check(args)))
    return guarded or status[0]


if __name__ == "__main__":
    exit_process(main())
