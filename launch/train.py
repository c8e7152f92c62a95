"""Train with Diff-Tuning: `deepspeed launch/train.py --config configs/X.yaml key=value ...`.

Also runs as a single process (`python launch/train.py ...`) and under torchrun/srun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import exit_process, run_guarded  # noqa: E402
from trainer.config import load_config  # noqa: E402

TRAIN_KEYS = ("model.pretrained", "data.target")
from trainer.loop import train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a preset name from configs/ or a YAML file")
    parser.add_argument("--resume", action="store_true", help="continue the run in run.dir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run.dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    return run_guarded(
        lambda: train(
            load_config(args.config, args.overrides, TRAIN_KEYS), resume=args.resume, overwrite=args.overwrite
        )
    )


if __name__ == "__main__":
    exit_process(main())
