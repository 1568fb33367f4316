"""Progress in job logs: periodic log lines, never tqdm's carriage-return redraws."""

from __future__ import annotations

import io
import logging

from tqdm import tqdm

from msa import progress as progress_module
from msa.progress import LogProgress, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_job_log_gets_log_lines_and_no_carriage_returns(monkeypatch, caplog):
    log_file = io.StringIO()  # what stderr is under Snakemake or SLURM: not a terminal
    monkeypatch.setattr("sys.stderr", log_file)
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="msa.progress"):
        assert list(progress(range(3), desc="predict s000", unit="chunk")) == [0, 1, 2]
    assert "\r" not in log_file.getvalue()
    assert "predict s000: 3/3 chunk" in caplog.text and "(done)" in caplog.text


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr", FakeTerminal())
    bar = progress(range(2), desc="ingest", unit="B")
    assert isinstance(bar, tqdm)
    bar.close()


def test_log_lines_come_at_most_every_interval(caplog):
    now = [0.0]
    tracker = LogProgress(desc="pretrain epoch 1/2", total=100, unit="row", every_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="msa.progress"):
        for t in (10, 30, 61, 70, 125):
            now[0] = t
            tracker.update(10)
        tracker.close()
        tracker.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["pretrain epoch 1/2: 30/100 row after 61 s",
                     "pretrain epoch 1/2: 50/100 row after 125 s",
                     "pretrain epoch 1/2: 50/100 row after 125 s (done)"]


def test_a_disabled_tracker_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="msa.progress"):
        with progress(total=5, desc="rank 1", enabled=False) as bar:
            bar.update(5)
    assert bar.n == 5 and not caplog.records
