"""Generate the memory bank with the pre-trained model, straight into shards:
`deepspeed launch/generate_bank.py --config X model.pretrained=/path data.bank=/out [bank.num_samples=5000 ...]`.

For model.family=sd_controlnet, SD samples freely and each sample's control is annotated from it.
Also runs as a single process (`python launch/generate_bank.py ...`) and under torchrun/srun. Every rank
writes the shards it owns; a rerun with the same settings builds only the missing or incomplete shards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import exit_process, run_guarded  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.jobs.bank import generate_bank  # noqa: E402

BANK_KEYS = ("model.pretrained", "data.bank")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a preset name from configs/ or a YAML file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. bank.num_samples=5000")
    args = parser.parse_args(argv)
    return run_guarded(lambda: generate_bank(load_config(args.config, args.overrides, BANK_KEYS)))


if __name__ == "__main__":
    exit_process(main())
