"""launch/gpu_check.py: its dry mode on the CPU plans every check and runs the cheap ones into one table and its
JSON; a failing check is a row, not a crash; the test device that tests/conftest.py picks; pytest's summary read."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import assert_ok, requested_test_device, run_entry
from trainer.benchmark.gpu_check import CHECKS, FAIL, OK, SKIP, Check, Context, pytest_counts, run_one


@pytest.mark.slow
def test_dry_run_plans_every_check_and_runs_the_cheap_ones(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_entry("gpu_check.py", ["--dry", "--out", str(out)], timeout=300)
    assert_ok(proc)
    report = json.loads(out.read_text())
    assert (report["device"], report["dry"], report["failed"]) == ("cpu", True, 0)
    rows = {row["check"]: row for row in report["rows"]}
    assert list(rows) == [check.name for check in CHECKS]
    cheap = {check.name for check in CHECKS if check.dry}
    assert cheap == {"environment"}  # a training run in the dry mode would cost the suite a minute
    assert {name for name, row in rows.items() if row["status"] == OK} == cheap
    for check in CHECKS:
        row = rows[check.name]
        assert f"{check.name:28} {row['status']:6}" in proc.stdout  # one line of the printed table each
        if check.name in cheap:
            continue
        assert row["status"] == SKIP and row["seconds"] == 0.0
        assert row["detail"] == (f"CPU: {check.cpu_skip}" if check.cpu_skip else "dry run: planned, not run")
        assert f"  {check.name}: {row['figures']['plan']}" in proc.stdout  # its command, whole
    assert "launch/train.py --config tiny_cpu" in rows["zero2_bf16_resume"]["figures"]["plan"]
    assert "pytest" in rows["pytest_cuda"]["figures"]["plan"]
    assert rows["environment"]["figures"]["device"].startswith("cpu")
    assert rows["environment"]["figures"]["torch"] == torch.__version__


def test_a_check_that_raises_or_is_out_of_time_is_a_row(tmp_path):
    def broken(ctx, until):
        raise KeyError("loss/kd")

    check = Check("broken", 10, broken, lambda ctx: "nothing")
    row = run_one(Context("cpu", tmp_path, {}), check, 10, phase_end=1e12)
    assert (row.status, row.detail) == (FAIL, "KeyError: 'loss/kd'")
    row = run_one(Context("cpu", tmp_path, {}), check, 10, phase_end=0.0)  # the overall budget is spent
    assert (row.status, row.detail) == (SKIP, "no time left in the overall budget")


@pytest.mark.parametrize(
    "environ, device",
    [({}, "cpu"), ({"DS_ACCELERATOR": "cpu"}, "cpu"), ({"DIFFTUNE_TEST_DEVICE": "cuda"}, "cuda"),
     ({"DS_ACCELERATOR": "cuda"}, "cuda"), ({"DIFFTUNE_TEST_DEVICE": "cpu", "DS_ACCELERATOR": "cuda"}, "cpu")],
)  # fmt: skip
def test_the_tests_stay_on_the_cpu_unless_cuda_is_asked_for(environ, device):
    assert requested_test_device(environ) == device
    with pytest.raises(ValueError, match="DIFFTUNE_TEST_DEVICE='tpu'"):
        requested_test_device({"DIFFTUNE_TEST_DEVICE": "tpu"})


def test_pytest_summary_counts():
    output = "tests/a.py ..s\nFAILED tests/a.py::test_x - boom\n==== 3 passed, 2 skipped, 1 error in 40.1s ====\n"
    assert pytest_counts(output) == {"passed": 3, "skipped": 2, "errors": 1}
    assert pytest_counts("=== 1 failed, 4 passed in 2.0s ===") == {"failed": 1, "passed": 4}
    assert pytest_counts("collecting ...") == {}
