"""Evaluate a model folder or a run: `deepspeed launch/evaluate.py --config X eval.model=/run eval.reference=/real
eval.out=/out eval.inception=/path/pt_inception-2015-12-05-6726825d.pth [eval.mode=metrics ...]`.

SD 1.5 + ControlNet (a config with model.family=sd_controlnet and model.pretrained=<SD folder>): eval.model is the
run or its exported ControlNet, and eval.data=<shards of launch/prepare_data.py> gives the prompts and control maps
(sample i takes entry i mod N); guidance is against the empty prompt with the control kept, as the pipeline's.

Modes (eval.mode): metrics (FID, sFID, KID, precision/recall of eval.num_samples samples against the reference;
defaults FID-10K, DDIM-50, CFG 1.5), replacement (DiT: the last p% of the reverse steps by eval.pretrained, for each
p of eval.handover), denoising (ε-MSE by noise level of eval.models on held-out target shards and on data.bank),
drift (L2-EWC of eval.model from eval.pretrained; a ControlNet's by default from where its training started).
Every rank samples the shards it owns; a rerun with the same settings redoes only what is missing. Also runs as a
single process (`python launch/evaluate.py ...`) and under torchrun/srun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import exit_process, run_guarded  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.evaluation.evaluate import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a preset name from configs/ or a YAML file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.num_samples=5000")
    args = parser.parse_args(argv)
    return run_guarded(lambda: evaluate(load_config(args.config, args.overrides)))


if __name__ == "__main__":
    exit_process(main())
