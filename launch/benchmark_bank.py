"""Bank-generation throughput on 1 and 2 processes, side by side: `python launch/benchmark_bank.py`.

Builds the tiny CPU DiT (or uses --pretrained), runs launch/generate_bank.py once per process count (torchrun
for more than one) and reads each run's summary line. The banks must come out byte-identical.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SUMMARY = re.compile(r"bank: (\d+) samples generated .* in ([\d.]+) s on (\d+) rank\(s\): ([\d.]+) samples/s")


def run(num_procs: int, args: argparse.Namespace, pretrained: Path, bank: Path) -> tuple[float, float]:
    script = str(ROOT / "launch" / "generate_bank.py")
    launcher = [sys.executable, script]
    if num_procs > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run"]  # this interpreter: its build of DeepSpeed's ops
        launcher = [*torchrun, "--standalone", f"--nproc_per_node={num_procs}", script]
    overrides = [f"model.pretrained={pretrained}", f"data.bank={bank}", "bank.preview=0", f"bank.seed={args.seed}"]
    overrides += [f"bank.{key}={getattr(args, key)}" for key in ("num_samples", "batch_size", "num_steps")]
    overrides.append(f"bank.samples_per_shard={args.samples_per_shard}")
    # Same threads per process for every run, so that the columns compare processes, not thread pools.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(launcher + ["--config", "tiny_cpu", *overrides], env=env, capture_output=True, text=True)
    match = SUMMARY.search(proc.stdout)
    if proc.returncode or not match:
        sys.exit(
            f"{num_procs} process(es) failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return float(match.group(2)), float(match.group(4))


def bank_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("shard-*.tar")) + [folder / "manifest.json"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="a DiT folder; default: a tiny random DiT built for the benchmark")
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--samples_per_shard", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = Path(args.pretrained) if args.pretrained else None
        if pretrained is None:
            from tests.tiny import make_tiny_dit

            pretrained = make_tiny_dit(Path(tmp) / "tiny_dit")
        results = {n: run(n, args, pretrained, Path(tmp) / f"bank_{n}") for n in args.procs}
        banks = [bank_bytes(Path(tmp) / f"bank_{n}") for n in args.procs]
    identical = all(bank == banks[0] for bank in banks)
    print(
        f"bank generation: {args.num_samples} samples, DDIM-{args.num_steps}, batch {args.batch_size}, "
        f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs"
    )
    print(f"{'processes':>9} {'seconds':>8} {'samples/s':>10} {'speed-up':>8}")
    base = results[args.procs[0]][1]
    for n, (seconds, rate) in results.items():
        print(f"{n:>9} {seconds:>8.2f} {rate:>10.1f} {rate / base:>7.2f}x")
    print(f"banks byte-identical across process counts: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
