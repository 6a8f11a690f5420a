"""The benchmarks' GPU clock sampler (bench/common.py): it reads nvidia-smi's CSV, keeps only the
samples of the window asked for, and gives nothing (not a guess) where nvidia-smi is absent."""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import ClockSampler  # noqa: E402

# prints what `nvidia-smi --query-gpu=timestamp,clocks.sm,… -lms=…` prints: a header-less CSV line
# every 50 ms; the SM clock is 1900 MHz in the first 0.3 s and 1700 MHz afterwards
FAKE_NVIDIA_SMI = """#!/usr/bin/env python3
import datetime, time
start = time.time()
while True:
    now = datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    clock = 1900 if time.time() - start < 0.3 else 1700
    print(f"{now}, {clock}, 3201, 690.50, 0x0000000000000004", flush=True)
    time.sleep(0.05)
"""


def test_clock_sampler_reads_nvidia_smi_and_keeps_the_window_asked_for(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{sys.exec_prefix}/bin:/usr/bin:/bin")
    with ClockSampler(period_ms=50) as clocks:
        time.sleep(1.0)
        later = time.time()
        time.sleep(0.4)
    whole, steady = clocks.summary(), clocks.summary(since=later)
    assert whole["clock_samples"] > steady["clock_samples"] > 0
    assert steady["sm_clock_mhz"] == 1700.0
    assert steady["power_w"] == 690.5 and steady["mem_clock_mhz"] == 3201.0
    assert steady["clock_event_reasons"] == "0x0000000000000004"


def test_clock_sampler_gives_nothing_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))             # no nvidia-smi on it
    with ClockSampler() as clocks:
        time.sleep(0.1)
    assert clocks.summary() == {}
