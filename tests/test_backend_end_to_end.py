"""End to end on the tiny checkpoints: the command line writes an mp4 with the right frames, fps
and audio; the same seed gives the same frames; bad inputs fail with clear errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liveavatar_backend.audio import AudioFeatureExtractor, load_audio, to_16k_mono
from liveavatar_backend.errors import CheckpointError, InputError
from liveavatar_backend.fixtures import make_tiny_checkpoints
from liveavatar_backend.video import probe_mp4

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT.parent / "shared" / "examples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(tiny):
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    spec = ModelSpec.from_folder(tiny / "Wan2.2-S2V-14B", lora=tiny / "liveavatar.safetensors")
    return LiveAvatarEngine.load(spec, device="cpu")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "liveavatar_backend", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_cli_generates_mp4_with_audio(tiny, tmp_path):
    if not EXAMPLES.exists():
        pytest.skip("../shared/examples not present")
    out = tmp_path / "out.mp4"
    run = _cli("generate", "--ckpt-dir", tiny / "Wan2.2-S2V-14B", "--lora", tiny / "liveavatar.safetensors",
               "--image", EXAMPLES / "dwarven_blacksmith.jpg", "--audio", EXAMPLES / "dwarven_blacksmith.wav",
               "--prompt", "A dwarf talks in his forge.", "--size", "384x256", "--num-clip", "1",
               "--steps", "2", "--seed", "3", "--device", "cpu", "--out", out)
    assert run.returncode == 0, run.stderr[-2000:]
    info = probe_mp4(out)
    assert (info["frames"], info["fps"], info["has_audio"]) == (48 * 1 - 3, 25.0, True)
    assert info["audio_sample_rate"] == 24000                    # the voice's own rate (the model hears 16 kHz)
    assert (info["width"], info["height"]) == (384, 256)          # 720×400 portrait, area 384*256


def test_cli_refuses_settings_and_outputs_before_loading_anything(tiny, tmp_path):
    folder, a_file = tmp_path / "videos", tmp_path / "notes.txt"
    folder.mkdir()
    a_file.write_text("not a folder")
    base = ["generate", "--ckpt-dir", tiny / "Wan2.2-S2V-14B", "--image", EXAMPLES / "boy.jpg",
            "--audio", EXAMPLES / "dwarven_blacksmith.wav", "--prompt", "x", "--device", "cpu"]
    for extra, words in ((["--size", "foo", "--out", tmp_path / "o.mp4"], "size 'foo'"),
                         (["--seed", "-1", "--out", tmp_path / "o.mp4"], "seed -1"),
                         (["--num-clip", "-2", "--out", tmp_path / "o.mp4"], "num_clips is -2"),
                         (["--out", folder], "is a folder"),
                         (["--out", a_file / "x.mp4"], "cannot be created")):
        run = _cli(*base, *extra)
        assert run.returncode == 2 and words in run.stderr, run.stderr[-1500:]
        assert "loading" not in run.stderr and "Traceback" not in run.stderr


def test_cli_stopped_by_sigterm_leaves_no_file(tiny, tmp_path):
    """`timeout`, `docker stop` or a closed terminal end the render like Ctrl-C: no partial mp4."""
    import signal
    if not EXAMPLES.exists():
        pytest.skip("../shared/examples not present")
    out = tmp_path / "out.mp4"
    process = subprocess.Popen([sys.executable, "-m", "liveavatar_backend", "generate", "--ckpt-dir",
                                str(tiny / "Wan2.2-S2V-14B"), "--image", str(EXAMPLES / "boy.jpg"),
                                "--audio", str(EXAMPLES / "dwarven_blacksmith.wav"), "--prompt", "x",
                                "--size", "256*192", "--steps", "2", "--device", "cpu", "--out", str(out)],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:                     # the plan is printed just before rendering starts
        if " clips, " in line:
            break
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130 and "interrupted" in rest
    assert list(tmp_path.iterdir()) == []


def test_same_seed_same_latents_and_other_seed_differs(engine):
    portrait = torch.rand(400, 720, 3)
    voice = torch.randn(16000 * 2) * 0.1
    runs = []
    for seed in (5, 5, 6):
        job = engine.prepare(portrait, voice, "a person", size="384*256", num_clips=1, steps=2, seed=seed)
        runs.append(next(engine.sample(job)))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_fast_mode_tracks_balanced_and_holds_e4m3_caches(tiny, monkeypatch):
    """memory_mode 'fast' through the engine (FP8 attention emulated on the CPU) against 'balanced'."""
    from liveavatar_backend import pipeline
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    from liveavatar_backend.fp8 import FP8_DTYPE
    spec = ModelSpec.from_folder(tiny / "Wan2.2-S2V-14B", lora=tiny / "liveavatar.safetensors")
    cache_dtypes = []
    original = pipeline.BlockSampler.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        cache_dtypes.append(self.bank.k[0][0].dtype)
    monkeypatch.setattr(pipeline.BlockSampler, "__init__", recording)
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 2) * 0.1
    clips = {}
    for mode in ("balanced", "fast"):
        engine = LiveAvatarEngine.load(spec, device="cpu", memory_mode=mode)
        job = engine.prepare(portrait, voice, "a person", size="384*256", num_clips=1, steps=2, seed=5)
        clips[mode] = next(engine.sample(job))
    assert cache_dtypes == [torch.float32, FP8_DTYPE]
    error = ((clips["fast"] - clips["balanced"]).norm() / clips["balanced"].norm()).item()
    assert 0 < error < 0.05


def test_bad_inputs_fail_clearly(engine, tiny, tmp_path):
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000) * 0.1
    with pytest.raises(InputError, match="size"):
        engine.prepare(portrait, voice, "a person", size="384-256", num_clips=1, steps=2, seed=0)
    with pytest.raises(InputError, match="steps"):
        engine.prepare(portrait, voice, "a person", size="384*256", num_clips=1, steps=5, seed=0)
    with pytest.raises(InputError, match="prompt"):
        engine.prepare(portrait, voice, "  ", size="384*256", num_clips=1, steps=2, seed=0)
    with pytest.raises(InputError, match="audio"):
        engine.prepare(portrait, torch.zeros(10), "a person", size="384*256", num_clips=1, steps=2, seed=0)
    with pytest.raises(InputError, match="is a folder"):
        load_audio(tmp_path)
    corrupt = tmp_path / "voice.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    with pytest.raises(InputError, match="voice.wav"):
        load_audio(corrupt)
    run = _cli("generate", "--ckpt-dir", tmp_path, "--image", EXAMPLES / "boy.jpg", "--audio", corrupt,
               "--prompt", "x", "--device", "cpu", "--out", tmp_path / "o.mp4")
    assert run.returncode == 2 and "voice.wav" in run.stderr and not (tmp_path / "o.mp4").exists()


def test_model_files_that_do_not_match_fail_loudly(tiny, tmp_path):
    from liveavatar_backend.loading import load_dit
    folder = tiny / "Wan2.2-S2V-14B"
    shard = folder / "diffusion_pytorch_model-00002-of-00004.safetensors"
    broken = tmp_path / "Wan2.2-S2V-14B"
    broken.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f != shard:
            (broken / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match="00002-of-00004.*missing"):
        load_dit(broken, dtype=torch.float32)
    (broken / shard.name).write_bytes(shard.read_bytes()[:1000])          # truncated
    with pytest.raises(CheckpointError, match="00002-of-00004"):
        load_dit(broken, dtype=torch.float32)


def test_a_wav2vec2_the_dit_cannot_read_fails_at_load_naming_it(tiny, tmp_path):
    from liveavatar_backend.audio import write_tiny_wav2vec2
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    other = write_tiny_wav2vec2(tmp_path / "wav2vec2-base", layers=4)         # the tiny DiT reads 3 states
    spec = ModelSpec.from_folder(tiny / "Wan2.2-S2V-14B", audio_encoder=other)
    with pytest.raises(CheckpointError, match="wav2vec2-base: this wav2vec2 gives 5 hidden states of width 32, "
                                              "but the DiT reads 3"):
        LiveAvatarEngine.load(spec, device="cpu")


def test_audio_decoding_resamples_any_format(tmp_path):
    import av
    import numpy as np
    for codec, ext, rate in (("flac", "flac", 44100), ("libmp3lame", "mp3", 48000)):
        path = tmp_path / f"tone.{ext}"
        with av.open(str(path), "w") as out:
            stream = out.add_stream(codec, rate=rate, layout="stereo")
            tone = (0.3 * np.sin(np.arange(rate) * 2 * np.pi * 440 / rate)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        wave, got = load_audio(path)
        voice = to_16k_mono(wave, got)
        assert got == rate and abs(voice.numel() / 16000 - 1.0) < 0.1 and voice.abs().max() > 0.2


@pytest.mark.parametrize("width, to_pcm", [(1, lambda x: (x * 127 + 128).astype("uint8")),      # unsigned
                                            (2, lambda x: (x * 32767).astype("<i2"))])
def test_integer_wav_decodes_centred_at_full_level(tmp_path, width, to_pcm):
    import wave

    import numpy as np
    tone = 0.5 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)
    path = tmp_path / f"tone-{8 * width}bit.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(width)
        out.setframerate(16000)
        out.writeframes(to_pcm(tone).tobytes())
    voice, rate = load_audio(path)
    assert rate == 16000 and abs(float(voice.mean())) < 0.01
    assert float(voice.max()) == pytest.approx(0.5, abs=0.01) and float(voice.min()) == pytest.approx(-0.5, abs=0.01)


def test_wav2vec2_folder_and_comfy_file_agree(tiny):
    folder = AudioFeatureExtractor.load(tiny / "Wan2.2-S2V-14B" / "wav2vec2-large-xlsr-53-english")
    single = AudioFeatureExtractor.load(tiny / "comfyui" / "audio_encoders" / "wav2vec2_large_english_fp16.safetensors")
    voice = torch.randn(16000 * 3) * 0.1
    a, b = folder.extract(voice), single.extract(voice)
    assert a.shape == b.shape == (3, 32, 75)
    assert (a - b).norm() / a.norm() < 1e-2                                 # fp16 storage of the ComfyUI file
