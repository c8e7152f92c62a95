"""The glyph experiment's gates (trainer/experiments/glyphs.py): is the premise of Diff-Tuning there to test?

Fine-tunes the shipped Latin-letter DiT (assets/glyphs) on the 100 Greek training capitals, then measures gate 2
(low-noise denoising of held-out Greek capitals: the pre-trained model with the null class against the fine-tuned
model with their class) and gate 3 (the last 10% of the sampling steps handed to the pre-trained model). Gate 1
is measured when the assets are built (assets/glyphs/models_info.json). Writes --out/gates.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.experiments.glyphs import glyph_plan, run_gates  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/glyphs", help="the jobs' folder (shards, runs, samples)")
    parser.add_argument("--steps", type=int, default=2000, help="fine-tuning steps of the gates' model")
    parser.add_argument("--assets", default=None, help="the source model and feature net (default: assets/glyphs)")
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value for every job")
    args = parser.parse_args(argv)
    assets = {} if args.assets is None else {"assets": Path(args.assets).resolve()}
    gates = run_gates(glyph_plan(Path(args.out).resolve(), args.overrides, **assets), args.steps)
    print(json.dumps({k: v for k, v in gates.items() if k != "gate_2_low_noise_retention"}, indent=2))
    print(json.dumps({k: v for k, v in gates["gate_2_low_noise_retention"].items() if k != "all_bands"}, indent=2))


if __name__ == "__main__":
    main()
