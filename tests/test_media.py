"""The VAE, the audio features and the mp4 writer on tiny data."""
import json
from pathlib import Path

import pytest
import torch

import liveavatar_backend.audio as audio
from liveavatar_backend.errors import CheckpointError, InputError
from liveavatar_backend.vae import WanVAE, build_vae, wan_to_diffusers_key, write_tiny_vae
from liveavatar_backend.video import Mp4Writer, probe_mp4

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "liveavatar_dit_14b_keys.json"


def test_the_published_vae_keys_convert_completely():
    if not MANIFEST.exists():
        pytest.skip("manifest not present")
    entry = next(v for k, v in json.loads(MANIFEST.read_text())["other_checkpoints"].items() if "vae" in k)
    converted = {wan_to_diffusers_key(name): shape for name, shape in entry["keys"]}
    expected = {name: list(t.shape) for name, t in build_vae(96).state_dict().items()}
    assert len(entry["keys"]) == 194 and converted == expected


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return WanVAE.load(write_tiny_vae(tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth", base_dim=4))


def _video(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _assert_same_function(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 through ~30 convolutions whose algorithm depends on the chunk length: agreement to
    rounding (a wrong cache or chunk boundary is off by 1e-1, not 1e-5)."""
    assert actual.shape == expected.shape
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def _diffusers_decode(vae, latents):
    """diffusers' own decode (one latent per decoder call), the reference for our chunked paths."""
    z = (latents.float() * vae.std + vae.mean).to(vae.dtype)
    return vae.model.decode(z).sample.float().clamp(-1, 1)


def test_encode_in_larger_calls_equals_diffusers_encode(vae):
    video = _video(19, 64)                                               # 19 frames -> 5 latents (2 dropped)
    expected = (vae.model.encode(video).latent_dist.mean.float() - vae.mean) / vae.std
    for frames_per_call in (4, 8, 24):
        latents = vae.encode(video, frames_per_call)
        assert latents.shape == (1, 16, 5, 8, 8)
        _assert_same_function(latents, expected)
    for bad in (6, 0, -4):
        with pytest.raises(ValueError, match="frames_per_call must be a positive multiple of 4"):
            vae.encode(video, bad)
    with pytest.raises(ValueError, match="latents_per_call must be at least 1"):
        vae.stream_decoder(0)


def test_reference_latent_is_the_first_latent_of_the_static_motion_encode(vae):
    portrait = _video(1, 64)
    motion = vae.encode(portrait.expand(-1, -1, 73, -1, -1))
    assert motion.shape[2] == 19
    torch.testing.assert_close(motion[:, :, :1], vae.encode(portrait), rtol=0, atol=0)


@pytest.mark.parametrize("latents_per_call", [1, 2, 3, 12])
def test_streaming_decode_equals_diffusers_decode(vae, latents_per_call):
    latents = vae.encode(_video(9, 64, seed=1))                         # 9 frames -> 3 latents
    assert latents.shape == (1, 16, 3, 8, 8)
    whole = _diffusers_decode(vae, torch.cat([latents, latents], dim=2))
    stream = vae.stream_decoder(latents_per_call)
    parts = torch.cat([stream.decode(latents), stream.decode(latents)], dim=2)
    assert parts.shape == whole.shape == (1, 3, 21, 64, 64)
    _assert_same_function(parts, whole)


def test_clip_decoder_overlapped_equals_in_line_and_drops_the_leading_frames(vae):
    """submit/collect hands back exactly what decode() gives, in order: a primed stream, the first
    3 frames of the video dropped, frames [F, H, W, 3] in [0, 1] on the CPU."""
    from liveavatar_backend.clip_decoder import ClipDecoder
    latents = vae.encode(_video(25, 64, seed=3))[0]                      # [16, 7, 8, 8]
    warm, blocks = latents[:, :3], [latents[:, 3:5], latents[:, 5:7], latents[:, 3:4]]
    in_line = ClipDecoder(vae, warm[None])
    expected = [in_line.decode(b) for b in blocks]
    assert [f.shape for f in expected] == [(5, 64, 64, 3), (8, 64, 64, 3), (4, 64, 64, 3)]
    assert all(f.device.type == "cpu" and 0 <= f.min() and f.max() <= 1 for f in expected)
    stream = vae.stream_decoder()
    stream.warm_up(warm[None])
    reference = (stream.decode(latents[None, :, 3:7])[0] + 1) / 2          # blocks 0 and 1 at once
    _assert_same_function(torch.cat(expected[:2]), reference.permute(1, 2, 3, 0)[3:])
    overlapped = ClipDecoder(vae, warm[None], max_in_flight=1)
    got = []
    for b in blocks:
        overlapped.submit(b)
        got += overlapped.collect()
    got += overlapped.collect(wait=True)
    assert overlapped.collect(wait=True) == []
    assert len(got) == 3
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    overlapped.submit(blocks[0])
    with pytest.raises(RuntimeError, match="collect"):
        overlapped.decode(blocks[0])
    with pytest.raises(ValueError, match="max_in_flight"):
        ClipDecoder(vae, warm[None], max_in_flight=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the overlapped decode's stream logic needs a CUDA GPU")
def test_clip_decoder_on_its_cuda_stream_waits_for_the_latents_and_keeps_them(tmp_path):
    """The latents come out of a long queue of work on the caller's stream and are dropped, their
    memory overwritten, right after submit: the decode must still see the right values."""
    from liveavatar_backend.clip_decoder import ClipDecoder
    vae = WanVAE.load(write_tiny_vae(tmp_path / "Wan2.1_VAE.pth", base_dim=4), device="cuda")
    latents = vae.encode(_video(25, 64, seed=4).cuda())[0]
    warm, blocks = latents[:, :3], [latents[:, 3:5], latents[:, 5:7]]
    in_line = ClipDecoder(vae, warm[None])
    expected = [in_line.decode(b) for b in blocks]
    overlapped = ClipDecoder(vae, warm[None])
    got, trash = [], []
    for b in blocks:
        slow = torch.randn(2048, 2048, device="cuda")
        for _ in range(30):                          # tens of ms queued before the latents exist
            slow = torch.tanh(slow @ slow)
        late = b + slow.sum() * 0                    # the same values, made at the end of that queue
        overlapped.submit(late)
        del late                                     # same-size NaN tensors would take its memory
        trash += [torch.full_like(b, float("nan")) for _ in range(4)]    # if it were not protected
        got += overlapped.collect()
    got += overlapped.collect(wait=True)
    assert len(got) == 2 and all(f.is_pinned() for f in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cudnn_autotune_is_scoped_to_the_vae_calls(vae, monkeypatch):
    from liveavatar_backend import vae as vae_module
    seen = []
    decoder = vae.decoder
    monkeypatch.setattr(vae, "decoder", lambda *a, **k: seen.append(torch.backends.cudnn.benchmark) or decoder(*a, **k))
    torch.backends.cudnn.benchmark = False
    assert vae.autotune_convs is False                      # a CPU VAE: nothing to time
    monkeypatch.setattr(vae, "autotune_convs", True)
    vae.stream_decoder().decode(torch.zeros(1, 16, 2, 4, 4))
    assert seen == [True, True] and torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(vae, "autotune_convs", False)
    vae.stream_decoder().decode(torch.zeros(1, 16, 2, 4, 4))
    assert seen[2:] == [False, False]
    with pytest.raises(RuntimeError), vae_module.cudnn_autotune():
        raise RuntimeError("a failing decode")
    assert torch.backends.cudnn.benchmark is False


def test_compiled_vae_traces_and_matches_eager(tmp_path):
    vae = WanVAE.load(write_tiny_vae(tmp_path / "Wan2.1_VAE.pth", base_dim=4))
    video = _video(13, 32, seed=2)
    latents = vae.encode(video)
    frames = vae.stream_decoder().decode(latents)
    graphs = []

    def record(graph_module, example_inputs):        # a dynamo backend that runs the traced graph as is
        graphs.append(graph_module)
        return graph_module.forward

    vae.enable_compile(backend=record)
    _assert_same_function(vae.encode(video), latents)
    _assert_same_function(vae.stream_decoder().decode(latents), frames)
    convs = [n for gm in graphs for n in gm.graph.nodes if "conv3d" in str(n.target)]
    assert len(convs) > 10                           # the convolutions went through the traced graphs


def test_vae_file_that_does_not_match_fails(tmp_path):
    path = write_tiny_vae(tmp_path / "v.pth", base_dim=4)
    state = torch.load(path, weights_only=True)
    del state["decoder.head.2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing.pth.*missing"):
        WanVAE.load(tmp_path / "missing.pth")
    state["decoder.head.2.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="decoder.head.2.bias"):
        WanVAE.load(tmp_path / "shape.pth")


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    folder = audio.write_tiny_wav2vec2(tmp_path_factory.mktemp("w2v") / "wav2vec2-large-xlsr-53-english")
    return audio.AudioFeatureExtractor.load(folder)


def test_features_follow_the_official_bucketing(extractor):
    voice = torch.randn(16000 * 4) * 0.1
    states = extractor.hidden_states_30hz(voice)
    feats = extractor.extract(voice)
    assert feats.shape[:2] == (3, 32)
    torch.testing.assert_close(feats[..., 5], states[:, 6])             # frame 5 -> round(1.2 * 5) = 6
    window = extractor.windows(voice)(feats.shape[-1] - 2, 12)          # runs past the end: zeros
    assert window[..., 2:].abs().sum() == 0 and window[..., :2].abs().sum() > 0
    assert audio.clips_for_audio(16000 * 10) == 6                      # spec §3.2 worked example


def test_windowed_features_match_the_whole_file(extractor, monkeypatch):
    voice = torch.randn(16000 * 12) * 0.1
    whole = extractor.extract(voice)
    monkeypatch.setattr(audio, "WHOLE_FILE_SECONDS", 5.0)
    monkeypatch.setattr(audio, "WINDOW_SECONDS", 4.0)
    monkeypatch.setattr(audio, "CONTEXT_SECONDS", 2.0)
    windows = extractor.windows(voice)
    assert windows.whole is None
    part = windows(100, 60)
    assert (part - whole[..., 100:160]).norm() / whole[..., 100:160].norm() < 0.02


def test_mp4_writer_removes_its_partial_file_on_error(tmp_path):
    out = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError):
        with Mp4Writer(out, 64, 48, audio=(torch.zeros(16000), 16000)) as writer:
            writer.write(torch.rand(12, 48, 64, 3))
            raise RuntimeError("stopped")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="even"):
        Mp4Writer(out, 65, 48)
    with Mp4Writer(out, 64, 48, audio=(torch.zeros(48000), 16000)) as writer:
        writer.write(torch.rand(45, 48, 64, 3))
        writer.write(torch.rand(48, 48, 64, 3))
    info = probe_mp4(out)
    assert (info["frames"], info["fps"], info["has_audio"]) == (93, 25.0, True)
    assert abs(info["duration"] - 93 / 25) < 0.1                        # audio cut at the end of the video
    workflow = {"prompt": {"4": {"class_type": "LiveAvatarSampler"}}, "workflow": {"nodes": [], "version": 0.4}}
    with Mp4Writer(out, 64, 48, audio=(torch.zeros(37800 * 2), 37800), metadata=workflow) as writer:
        writer.write(torch.rand(45, 48, 64, 3))               # a sample rate AAC cannot carry
    info = probe_mp4(out)
    assert info["audio_sample_rate"] == 48000 and abs(info["duration"] - 45 / 25) < 0.1
    import av
    with av.open(str(out)) as container:                     # tags as core SaveVideo writes them
        assert {key: json.loads(container.metadata[key]) for key in workflow} == workflow


def test_mp4_writer_interleaves_the_voice_and_refuses_paths_it_cannot_write(tmp_path, monkeypatch):
    import av
    out = tmp_path / "long.mp4"
    with Mp4Writer(out, 64, 48, audio=(torch.rand(16000 * 8) - 0.5, 16000)) as writer:
        for _ in range(4):
            writer.write(torch.rand(48, 48, 64, 3))
    with av.open(str(out)) as container:
        kinds = [packet.stream.type for packet in container.demux() if packet.size]
    video_packets = kinds.count("video")
    first_audio = kinds.index("audio")
    assert video_packets == 192 and first_audio < len(kinds) // 2      # not all at the end of the file
    assert probe_mp4(out)["duration"] == pytest.approx(192 / 25, abs=0.1)
    for bad, words in ((tmp_path, "is a folder"), (out / "x.mp4", "cannot be created")):
        with pytest.raises(InputError, match=words):
            Mp4Writer(bad, 64, 48)
    monkeypatch.setattr(Mp4Writer, "_write_audio", lambda self, end: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(tmp_path / "stopped.mp4", 64, 48, audio=(torch.zeros(16000), 16000)) as writer:
            writer.write(torch.rand(12, 48, 64, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]     # no partial file left
