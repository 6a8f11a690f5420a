"""The sharded multi-device DiT (issue 5) on CPUs: the schedule's dependencies, gloo worker
processes that reproduce the single-process latents exactly, and failures that end cleanly."""
import os
import signal
import subprocess
import time

import pytest
import torch

from liveavatar_backend import constants as C
from liveavatar_backend.errors import CheckpointError, GenerationInterrupted, InputError
from liveavatar_backend.fixtures import make_tiny_checkpoints
from liveavatar_backend.parallel import WorkerError, parse_devices
from liveavatar_backend.pipeline_schedule import (Denoise, Prefill, bubble_fraction, build_schedule, item_at,
                                                  stage_layers)

PORTRAIT = torch.rand(400, 720, 3, generator=torch.Generator().manual_seed(0))
VOICE = torch.randn(16000 * 5, generator=torch.Generator().manual_seed(1)) * 0.1     # 5 s -> 3 clips


# ------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("steps", [2, 3, 4])
@pytest.mark.parametrize("clips", [1, 3])
def test_schedule_runs_every_item_once_and_respects_dependencies(stages, steps, clips):
    order = build_schedule(clips, steps, stages)
    tick = {item: t for t, item in enumerate(order) if item is not None}
    blocks = clips * C.BLOCKS_PER_CLIP
    denoise = [item for item in order if isinstance(item, Denoise)]
    assert sorted((d.block, d.step) for d in denoise) == [(b, s) for b in range(blocks) for s in range(steps)]
    assert order[0] == Prefill(rolling=False)
    for d in denoise:
        if d.step > 0:      # its input is the previous step's output, back from the last device
            assert tick[d] >= tick[Denoise(d.block, d.step - 1)] + stages
        if d.block > 0:     # the step's cache holds the previous block at every layer
            assert tick[d] > tick[Denoise(d.block - 1, d.step)]
    rolling = Prefill(rolling=True)
    if clips > 1:
        assert order.count(rolling) == 1
        assert all(tick[d] < tick[rolling] for d in denoise if d.clip == 0)
        assert all(tick[d] > tick[rolling] for d in denoise if d.clip > 0)
        assert tick[rolling] >= tick[Denoise(0, steps - 1)] + stages
    else:
        assert rolling not in order


def test_one_device_runs_block_by_block_and_two_devices_keep_both_busy():
    order = build_schedule(2, 4, 1)
    assert [(d.block, d.step) for d in order if isinstance(d, Denoise)][:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert bubble_fraction(order, 1) == 0
    assert bubble_fraction(build_schedule(10, 4, 2), 2) < 0.01       # steady state: no idle ticks
    assert item_at(order, 0, len(order)) is None


def test_stage_layers_cover_every_layer_once():
    for stages in range(1, 9):
        ranges = stage_layers(40, stages)
        assert [i for r in ranges for i in r] == list(range(40))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError):
        stage_layers(3, 4)


def test_parse_devices_names_the_bad_entry():
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    for bad, words in (("", "empty"), ("cuda:0,cuda:0", "twice"), ("gpu0", "'gpu0'"), (",".join(["cpu"] * 9), "at most"),
                       (f"cuda:{torch.cuda.device_count()}", "does not exist"), ("cpu,cuda:0", "mixes")):
        with pytest.raises(InputError, match=words):
            parse_devices(bad)


# ------------------------------------------------------------------ workers on CPUs (gloo)
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def spec(tiny):
    from liveavatar_backend.engine import ModelSpec
    return ModelSpec.from_folder(tiny / "Wan2.2-S2V-14B", lora=tiny / "liveavatar.safetensors")


@pytest.fixture(scope="module")
def single(spec):
    from liveavatar_backend.engine import LiveAvatarEngine
    return LiveAvatarEngine.load(spec, device="cpu")


@pytest.fixture(scope="module")
def sharded(spec):
    from liveavatar_backend.engine import LiveAvatarEngine
    engine = LiveAvatarEngine.load(spec, device="cpu,cpu")
    yield engine
    engine.close()


def _clips(engine, steps=3, seed=5, **kwargs):
    job = engine.prepare(PORTRAIT, VOICE, "a person talks", size="384*256", num_clips=0, steps=steps, seed=seed)
    return list(engine.sample(job, **kwargs))


def _worker_pids(engine) -> list[int]:
    return [w.process.pid for w in engine.workers.workers]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return open(f"/proc/{pid}/stat").read().split()[2] == "Z"


@pytest.fixture(scope="module")
def reference(single):
    return _clips(single)


def test_two_gloo_processes_give_the_single_process_latents(sharded, reference):
    assert not sharded.parkable and sharded.gpu_weight_bytes() == 0    # its layers live in the workers
    got = _clips(sharded)
    assert len(got) == len(reference) == 3                     # 5 s of voice: 3 clips, rolling sink used
    for a, b in zip(got, reference):
        assert torch.equal(a, b)
    reports = sharded.workers.last_reports
    assert len(reports) == 2 and all(r["busy_ticks"] > 0 for r in reports)


def test_three_processes_with_fewer_steps_than_devices(spec, single):
    from liveavatar_backend.engine import LiveAvatarEngine
    engine = LiveAvatarEngine.load(spec, device="cpu,cpu,cpu")
    try:
        got = _clips(engine, steps=2, seed=9)
    finally:
        engine.close()
    for a, b in zip(got, _clips(single, steps=2, seed=9)):
        assert torch.equal(a, b)


def test_stop_ends_every_worker_within_a_step_and_the_next_job_runs(sharded, reference):
    events = []

    def on_progress(event):
        events.append(event)

    with pytest.raises(GenerationInterrupted):
        _clips(sharded, on_progress=on_progress, should_stop=lambda: len(events) >= 1)
    assert len(events) <= 2                                    # stopped right after the first block
    assert sharded.workers.running                             # workers stay loaded
    assert all(torch.equal(a, b) for a, b in zip(_clips(sharded), reference))


def test_an_error_raised_by_the_progress_callback_ends_the_job_on_every_worker(sharded, reference):
    """ComfyUI interrupts from on_progress (throw_exception_if_processing_interrupted): the workers
    must leave that job, or the next one reads its blocks or waits for its audio forever."""
    class Cancelled(Exception):
        pass

    def cancel(event):
        if event.latents is not None:
            raise Cancelled("the user pressed cancel")

    pids = _worker_pids(sharded)
    with pytest.raises(Cancelled):
        _clips(sharded, on_progress=cancel)
    assert _worker_pids(sharded) == pids and sharded.workers.running      # still loaded
    got = _clips(sharded)
    assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference))


def test_an_audio_failure_while_abandoning_a_job_ends_the_workers_and_the_next_job_starts_fresh(
        sharded, reference, monkeypatch):
    from liveavatar_backend import parallel
    pids = _worker_pids(sharded)
    calls = []

    def audio_then_fail(features):
        def fetch(first, count):
            calls.append(first)
            if len(calls) > 1:
                raise OSError("the audio went away")
            return features(first, count)
        return fetch

    sample = parallel.PipelineWorkers.sample
    monkeypatch.setattr(parallel.PipelineWorkers, "sample",
                        lambda self, plan, text, ref, motion, audio, **kw: sample(self, plan, text, ref, motion,
                                                                                 audio_then_fail(audio), **kw))
    with pytest.raises(OSError, match="the audio went away"):
        _clips(sharded)
    monkeypatch.undo()
    assert all(_gone(p) for p in pids)
    got = _clips(sharded)
    assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference))
    assert set(_worker_pids(sharded)).isdisjoint(pids)


def test_a_killed_worker_is_a_clear_error_and_the_next_job_starts_fresh_workers(sharded, reference):
    pids = _worker_pids(sharded)

    def kill_after_first_block(event):
        if event.block == 0 and event.clip == 0:
            os.kill(pids[1], signal.SIGKILL)

    with pytest.raises(WorkerError, match=r"worker 1 \(cpu\)"):
        _clips(sharded, on_progress=kill_after_first_block)
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), "a worker process was left behind"
    assert all(torch.equal(a, b) for a, b in zip(_clips(sharded), reference))   # fresh workers
    assert set(_worker_pids(sharded)).isdisjoint(pids)


def test_a_lora_that_does_not_match_fails_loudly_and_leaves_no_worker(spec, tmp_path):
    import dataclasses

    from safetensors.torch import save_file

    from liveavatar_backend.engine import LiveAvatarEngine
    bad = tmp_path / "other.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 7),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(7, 4)}, str(bad))
    before = _all_workers()
    with pytest.raises(CheckpointError, match="other.safetensors"):
        LiveAvatarEngine.load(dataclasses.replace(spec, lora=bad), device="cpu,cpu")
    assert _all_workers() <= before


def test_a_bad_vae_read_after_the_dit_ends_the_workers_with_the_load(spec, tmp_path):
    """The ranks load the DiT first; a component that fails after them must not leave them running
    (on GPUs each holds its share of the DiT) while the exception is still referenced."""
    import dataclasses

    from liveavatar_backend.engine import LiveAvatarEngine
    bad = tmp_path / "Wan2.1_VAE.pth"
    bad.write_bytes(b"not a checkpoint")
    before = _all_workers()
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth") as failure:
        LiveAvatarEngine.load(dataclasses.replace(spec, vae=bad), device="cpu,cpu")
    assert _all_workers() <= before, failure.value        # checked while the exception is referenced


def test_a_split_models_load_moves_the_progress_bar_as_its_workers_read_and_stops_there(spec):
    from liveavatar_backend.engine import LiveAvatarEngine
    from liveavatar_backend.loading import LoadProgress
    heard = []
    LiveAvatarEngine.load(spec, device="cpu,cpu", progress=heard.append).close()
    assert heard == sorted(set(heard)) and heard[-1] == 1.0
    assert len([f for f in heard if f < LoadProgress.DIT_SHARE]) > 10       # the workers' reports

    class Cancel(Exception):
        pass

    def cancel_at_a_third(fraction):
        if fraction > 0.33:
            raise Cancel(fraction)
    before = _all_workers()
    with pytest.raises(Cancel) as cancelled:
        LiveAvatarEngine.load(spec, device="cpu,cpu", progress=cancel_at_a_third)
    assert cancelled.value.args[0] < LoadProgress.DIT_SHARE     # while the workers were reading
    assert _all_workers() <= before                      # the cancel ended the workers


def test_workers_started_by_torchrun_give_the_same_latents(spec, reference, monkeypatch):
    """The multi-host path: torchrun starts the ranks (env:// rendezvous), the controller waits for them."""
    import secrets
    import socket
    import sys
    from pathlib import Path

    from liveavatar_backend.engine import LiveAvatarEngine
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, LIVEAVATAR_CONTROLLER=f"127.0.0.1:{port}", LIVEAVATAR_AUTHKEY=secrets.token_hex(16),
               PYTHONPATH=str(root), OMP_NUM_THREADS="2")
    for name in ("LIVEAVATAR_CONTROLLER", "LIVEAVATAR_AUTHKEY"):
        monkeypatch.setenv(name, env[name])
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "liveavatar_backend.parallel_worker"], env=env, cwd=root,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        engine = LiveAvatarEngine.load(spec, device="external:2")
        got = _clips(engine)
        engine.close()
        assert torchrun.wait(timeout=60) == 0          # the workers quit with the controller
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    for a, b in zip(got, reference):
        assert torch.equal(a, b)


def _all_workers() -> set[str]:
    found = subprocess.run(["pgrep", "-f", "liveavatar_backend.parallel_worker"], capture_output=True, text=True)
    return set(found.stdout.split())


def test_command_line_on_two_cpu_workers_writes_the_video_and_leaves_no_worker(tiny, tmp_path):
    import sys
    from pathlib import Path

    from liveavatar_backend.video import probe_mp4
    examples = Path(__file__).resolve().parents[2] / "shared" / "examples"
    if not examples.exists():
        pytest.skip("../shared/examples not present")
    out = tmp_path / "two.mp4"
    before = _all_workers()                   # workers of this module's loaded engines, if any
    run = subprocess.run([sys.executable, "-m", "liveavatar_backend", "generate", "--ckpt-dir", str(tiny / "Wan2.2-S2V-14B"),
                          "--lora", str(tiny / "liveavatar.safetensors"), "--image", str(examples / "dwarven_blacksmith.jpg"),
                          "--audio", str(examples / "dwarven_blacksmith.wav"), "--prompt", "A dwarf talks.",
                          "--size", "384*256", "--num-clip", "1", "--steps", "2", "--device", "cpu,cpu", "--out", str(out)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert probe_mp4(out)["frames"] == 48 - 3
    assert "2 pipeline workers ready on cpu, cpu" in run.stderr
    assert _all_workers() <= before
