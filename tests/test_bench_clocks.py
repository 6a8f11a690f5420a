"""The benchmarks' GPU clock sampler (bench/common.py): it reads nvidia-smi's CSV, keeps only the
samples of the window asked for, gives nothing (not a guess) where nvidia-smi is absent, and says
so where nvidia-smi fails."""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import ClockSampler  # noqa: E402

# prints what `nvidia-smi --query-gpu=timestamp,clocks.sm,… -lms=…` prints: a header-less CSV line
# every 50 ms; the GPU is at 1900 MHz and 400 W for the first 1.2 s, then at 1700 MHz and 690 W
FAKE_NVIDIA_SMI = """#!/usr/bin/env python3
import datetime, time
start = time.time()
while True:
    now = datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    clock, power = (1900, 400.25) if time.time() - start < 1.2 else (1700, 690.50)
    print(f"{now}, {clock}, 3201, {power}, 0x0000000000000004, 700.00, 1980", flush=True)
    time.sleep(0.05)
"""
FAILING_NVIDIA_SMI = """#!/bin/sh
echo "No devices were found" >&2
exit 6
"""


def fake_nvidia_smi(tmp_path, monkeypatch, script: str) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(script)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{sys.exec_prefix}/bin:/usr/bin:/bin")


def test_clock_sampler_reads_nvidia_smi_and_keeps_the_window_asked_for(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, FAKE_NVIDIA_SMI)
    with ClockSampler(period_ms=50) as clocks:
        time.sleep(0.6)
        early = time.time()
        time.sleep(1.0)
        late = time.time()
        time.sleep(0.3)
    whole, first, last = clocks.summary(), clocks.summary(until=early), clocks.summary(since=late)
    assert whole["clock_samples"] > first["clock_samples"] + last["clock_samples"] > 0
    assert whole["sm_clock_mhz"] == 1900.0 and first["sm_clock_mhz"] == 1900.0 and first["power_w"] == 400.25
    assert last["sm_clock_mhz"] == 1700.0 and last["power_w"] == 690.5 and last["mem_clock_mhz"] == 3201.0
    assert last["clock_event_reasons"] == "0x0000000000000004"
    assert last["power_limit_w"] == 700.0 and last["max_sm_clock_mhz"] == 1980.0


def test_clock_sampler_says_when_nvidia_smi_fails(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, FAILING_NVIDIA_SMI)
    with ClockSampler() as clocks:
        time.sleep(0.3)
    assert clocks.summary() == {"clock_error": "nvidia-smi exited with 6: No devices were found"}


def test_clock_sampler_gives_nothing_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))             # no nvidia-smi on it
    with ClockSampler() as clocks:
        time.sleep(0.1)
    assert clocks.summary() == {}
