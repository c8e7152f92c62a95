"""Continual multi-stage transfer in one launch: `deepspeed launch/continual.py --stages stages.yaml [key=value ...]`.

For each stage of the stages file (configs/continual/digits.yaml): compose the memory bank (the refresh generated
on every rank) -> train from the previous stage, EMA carried on -> export -> evaluate on the held-out data of
stages 1..k -> a row of run_dir/results.json. A rerun continues where a crash stopped; finished stages are never
redone. Also runs as a single process (`python launch/continual.py ...`) and under torchrun/srun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import exit_process, run_guarded  # noqa: E402
from trainer.continual.driver import run_continual  # noqa: E402
from trainer.continual.stages import load_stages  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", required=True, help="the stages YAML file")
    parser.add_argument(
        "--allow-stages-change", action="store_true", help="continue a run in progress with a changed stages file"
    )
    parser.add_argument("--until-stage", type=int, default=0, help="stop after this stage (1-based; 0: all)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the stages file, e.g. mode=finetune")
    args = parser.parse_args(argv)
    return run_guarded(
        lambda: run_continual(
            load_stages(args.stages, args.overrides),
            allow_stages_change=args.allow_stages_change,
            until_stage=args.until_stage,
        )
    )


if __name__ == "__main__":
    exit_process(main())
