"""The data of configs/continual/digits.yaml: scikit-learn's digits 5-9 in three stages (5 6, 7 8, 9), each with 50
training images per digit and the held-out half as eval data, prepared into shards with the shipped source model:
`python launch/make_continual_digits.py [--out runs/continual_digits/data]` (needs the `experiments` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import digits  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.jobs.prepare import prepare_data  # noqa: E402

STAGES = {"56": (5, 6), "78": (7, 8), "9": (9,)}
PER_CLASS = 50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/continual_digits/data", help="where the stages file expects the data")
    out = Path(parser.parse_args(argv).out)
    for name, group in STAGES.items():
        sets = {"target": digits.few_shot(group, PER_CLASS, seed=0), "heldout": digits.split(group, "heldout")}
        for kind, (images, labels) in sets.items():
            folder = digits.write_image_folder(images, labels, out / "images" / f"{kind}_{name}")
            overrides = ["model.pretrained=assets/digits/source_model", f"prepare.images={folder}",
                         f"data.target={out / f'{kind}_{name}'}"]  # fmt: skip
            prepare_data(load_config("digits", overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
