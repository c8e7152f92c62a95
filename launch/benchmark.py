"""Throughput benchmark: Diff-Tuning vs plain fine-tuning, side by side in one run, through launch/train.py.

Prints the median step time of each method (after warm-up), their ratio, and the share of step time spent
waiting for the global-batch planner and the shard reads (which run one step ahead
on a background thread). `python launch/benchmark.py [--steps N]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tiny import make_shards, make_tiny_dit  # noqa: E402

# "tiny" is the test model (data reading rivals its compute); "small" is a 4-block, 192-wide DiT on 16x16x4
# latents, where compute dominates as it does for real model sizes.
MODELS = {
    "tiny": dict(dit={}, shape=(3, 8, 8)),
    "small": dict(dit=dict(num_attention_heads=3, attention_head_dim=64, num_layers=4, in_channels=4,
                           out_channels=8, sample_size=16), shape=(4, 16, 16)),
}  # fmt: skip
METHODS = {"finetune": ["--config", "finetune"], "difftune": ["--config", "dit_xl2_paper"]}


def run(method: str, pretrained: Path, target: Path, bank: Path, run_dir: Path, steps: int) -> list[dict]:
    args = METHODS[method] + [
        f"model.pretrained={pretrained}", "model.num_classes=4", f"data.target={target}", f"data.bank={bank}",
        f"run.dir={run_dir}", f"train.steps={steps}", "train.precision=fp32", "run.log_every=1",
        "run.ckpt_every=100000", "run.sample_every=0", "run.export=false", "run.progress=false",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{method} run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    print(f"{'model':6} {'method':9} {'step ms':>8} {'img/s':>8} {'data wait %':>11}")
    for name in args.models:
        spec = MODELS[name]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            pretrained = make_tiny_dit(tmp / "pretrained", **spec["dit"])
            target = make_shards(tmp / "target", 512, shape=spec["shape"], per_shard=128)
            bank = make_shards(tmp / "bank", 512, shape=spec["shape"], num_classes=10, per_shard=128, seed=1)
            times = {}
            for repeat in range(2):  # alternate the methods so that drift of the machine hits both
                for method in METHODS:
                    metrics = run(method, pretrained, target, bank, tmp / f"{method}{repeat}", args.steps)
                    times.setdefault(method, []).extend(metrics[args.warmup :])
            for method, metrics in times.items():
                step_ms = statistics.median(32 / m["images_per_second"] for m in metrics) * 1000
                data = statistics.median(m["time/data_wait_fraction"] for m in metrics) * 100
                print(f"{name:6} {method:9} {step_ms:8.1f} {32000 / step_ms:8.1f} {data:10.2f}%")
                times[method] = step_ms
            print(f"{name:6} step-time ratio difftune / finetune = {times['difftune'] / times['finetune']:.3f}")


if __name__ == "__main__":
    main()
