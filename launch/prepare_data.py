"""Prepare target data: an ImageFolder (one subfolder per class) into shards of VAE latents (or pixels):
`deepspeed launch/prepare_data.py --config X model.pretrained=/path prepare.images=/images data.target=/out`.

For model.family=sd_controlnet, prepare.images is a folder with index.jsonl lines {"image", "caption", "control"}
(docs/models.md: Stable Diffusion 1.5 + ControlNet). Also runs as a single process and under torchrun/srun. Unreadable
images are listed in /out/report.json; a rerun with the same settings builds only the missing or incomplete shards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import exit_process, run_guarded  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.jobs.prepare import prepare_data  # noqa: E402

PREPARE_KEYS = ("model.pretrained", "prepare.images", "data.target")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a preset name from configs/ or a YAML file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. prepare.resolution=256")
    args = parser.parse_args(argv)
    return run_guarded(lambda: prepare_data(load_config(args.config, args.overrides, PREPARE_KEYS)))


if __name__ == "__main__":
    exit_process(main())
