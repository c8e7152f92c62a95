"""The embedded demo, on the CPU with no download: transfer the shipped source model to a shifted target domain.

Runs the real jobs: target images -> launch/prepare_data.py -> launch/generate_bank.py (the memory bank) ->
launch/train.py twice, plain fine-tuning and Diff-Tuning, same steps and seed -> samples of the pre-trained and
both exported models -> Fréchet distances on the target domain (torchmetrics' FID with the shipped feature
net), and each model's denoising error by noise level on unseen source and target images (what each one kept
and learned: the chain of forgetting). Writes into --out (replaced if it exists): results.json, grid_*.png, and
each job's folder (the TensorBoard logs are under finetune/ and difftune/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.experiments.demo import run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="the demo's folder (replaced)")
    parser.add_argument("--images_per_class", type=int, default=64, help="target training images per class")
    parser.add_argument("--eval_images", type=int, default=500, help="samples per model for the Fréchet distance")
    parser.add_argument("--bank_samples", type=int, default=0, help="memory bank size (0: configs/demo.yaml's)")
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="key=value for both trainings (method.* only changes Diff-Tuning)"
    )
    run_demo(parser.parse_args())


if __name__ == "__main__":
    main()
