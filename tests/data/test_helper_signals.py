"""A scheduler's signal sent to every process (SLURM's USR1 preemption warning, TERM) leaves the step loader's
helpers running: the forkserver, the resource tracker and the decoding workers ignore it; the rank keeps its own
handler and decides."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, child_env

SCRIPT = """
import signal, time
import numpy as np, psutil
from data.batch import StepLoader
from data.sampler import BANK, TARGET, GlobalBatchPlanner, TimestepSplit, slot_ids

received = []
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))  # the rank's preemption flag
sources = {
    TARGET: [{"x": np.full((2, 3, 3), i, np.float32), "label": i % 3} for i in range(13)],
    BANK: [{"x": np.full((2, 3, 3), -i, np.float32), "label": 3 + i % 2} for i in range(7)],
}
planner = GlobalBatchPlanner(global_batch_size=4, num_target=13, num_bank=7, bank_ratio=0.25, split=TimestepSplit(),
                             label_dropout=0.2, seed=5)
slots = [slot_ids(rank=0, micro_step=0, world_size=1, accumulation_steps=1, micro_batch_size=4)]
loader = StepLoader(planner, sources, slots, num_workers=2)
expected = [loader.dataset[step][0].x0 for step in range(6)]
assert (loader.get(0)[0].x0 == expected[0]).all()
helpers = psutil.Process().children(recursive=True)  # forkserver, resource tracker, workers
for helper in helpers:
    helper.send_signal(signal.SIGUSR1)
    helper.send_signal(signal.SIGTERM)
time.sleep(0.5)
for step in range(1, 6):
    assert (loader.get(step)[0].x0 == expected[step]).all()
alive = [h for h in helpers if h.is_running() and h.status() != psutil.STATUS_ZOMBIE]
assert alive == helpers, f"ended by the signals: {set(helpers) - set(alive)}"
signal.raise_signal(signal.SIGUSR1)  # the rank's handler is still its own
assert received == [signal.SIGUSR1]
loader.close()
print("helpers", len(helpers))
"""


def test_workers_and_their_server_ignore_the_schedulers_signals():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("helpers")[-1]) >= 4  # the server, the tracker and two workers were signalled
