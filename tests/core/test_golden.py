"""Golden per-step losses of a tiny seeded run: a refactor that changes the numbers is seen here.

If a change is meant to change them (a new RNG layout, a fixed bug), regenerate the file on purpose with
`UPDATE_GOLDEN=1 python -m pytest tests/core/test_golden.py` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_ok, read_metrics, run_entry, train_args

GOLDEN = Path(__file__).parent / "golden" / "tiny_dit_losses.json"
ARGS = ("train.steps=6", "run.ckpt_every=100", "run.export=false", "train.zero_stage=0", "train.precision=fp32")


@pytest.mark.slow
def test_per_step_losses_match_the_golden_run(tiny, tmp_path):
    run = tmp_path / "run"
    assert_ok(run_entry("train.py", train_args(tiny, run, *ARGS)))
    got = {str(m["step"]): [m["loss/total"], m["loss/target"], m["loss/bank"]] for m in read_metrics(run)}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"args": ARGS, "losses": got}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == list(ARGS) and golden["losses"].keys() == got.keys()
    for step, values in golden["losses"].items():
        np.testing.assert_allclose(got[step], values, rtol=1e-5, err_msg=f"step {step}")
