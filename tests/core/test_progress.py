"""Progress in a log: where stderr is no terminal (SLURM's .out, CI), a bar writes plain lines, a few, not a redraw
per update."""

from __future__ import annotations

import sys

from trainer import metrics


def test_a_log_gets_a_line_per_interval_not_a_redraw_per_update(capsys, monkeypatch):
    assert not sys.stderr.isatty()  # pytest captures stderr
    bar = metrics.progress_bar(total=1000, desc="train", unit="step", dynamic_ncols=True)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss="0.1234", refresh=False)
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    assert 1 <= len(lines) <= 3, lines  # the start, the end: far less than 30 s apart
    assert "1000/1000" in lines[-1] and "loss=0.1234" in lines[-1]


def test_the_interval_applies(capsys, monkeypatch):
    monkeypatch.setattr(metrics, "LOG_INTERVAL_S", 0.0)
    bar = metrics.progress_bar(total=5, miniters=1)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert len(capsys.readouterr().err.splitlines()) >= 5  # with no interval every update is a line
