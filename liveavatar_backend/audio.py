"""Voice input: decoding any common audio file, 16 kHz mono, and wav2vec2 features per video frame.

Decoding uses PyAV (FFmpeg), so wav (16/24-bit PCM and 32-bit float), mp3, flac, m4a/aac, ogg and
the audio track of a video all work; channels are averaged. Resampling uses
torchaudio.functional.resample (windowed sinc); the official code uses librosa's soxr_hq, which
differs below audibility.

Features (spec §2.5, §3.2): wav2vec2-large-xlsr-53-english, all hidden states (embeddings + every
layer) at 50 Hz → linear interpolation to 30 Hz (align_corners) → video frame i takes the 30 Hz
feature at round(1.2·i); frames past the end of the audio get zeros.

Long audio: up to WHOLE_FILE_SECONDS the whole file goes through wav2vec2 at once, exactly like the
official code. Longer files are processed in windows of WINDOW_SECONDS with CONTEXT_SECONDS of
audio on each side, one window at a time, so hours of audio never need hours of features in
memory (the transformer sees ±CONTEXT_SECONDS instead of the whole file; speech context beyond a
few seconds has no measurable effect on these features).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import constants as C
from .errors import CheckpointError, InputError

WHOLE_FILE_SECONDS = 60.0
WINDOW_SECONDS = 20.0
CONTEXT_SECONDS = 5.0
LOUDNESS_TARGET_DBFS = -20.0       # a common speech level; peaks are kept below PEAK_LIMIT
PEAK_LIMIT = 0.99
UNUSED_HEADS = ("lm_head.", "quantizer.", "project_q.", "project_hid.")   # CTC / pre-training heads
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# the conv feature encoder of wav2vec2 (transformers' Wav2Vec2Config defaults, used by -large too)
WAV2VEC_CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
WAV2VEC_CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)


# ------------------------------------------------------------------------------ decoding
def load_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Any audio (or video) file -> (mono float32 waveform [T], sample rate)."""
    import av
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise InputError(f"audio file {path} {what}; give the path of a wav/mp3/flac/m4a/ogg file")
    chunks, rate = [], None
    try:
        with av.open(str(path)) as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise InputError(f"audio file {path} has no audio track; give a voice recording")
            for frame in container.decode(streams[0]):
                raw = frame.to_ndarray()
                data = _integer_pcm_to_float(raw) if np.issubdtype(raw.dtype, np.integer) else raw.astype(np.float32)
                if frame.format.is_planar:
                    samples = data.reshape(len(frame.layout.channels), -1)
                else:
                    samples = data.reshape(-1, len(frame.layout.channels)).T
                chunks.append(samples.mean(axis=0))
                rate = frame.sample_rate
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"audio file {path} could not be decoded ({exc}); convert it to wav, mp3 or flac") from None
    if not chunks or rate is None or sum(len(c) for c in chunks) == 0:
        raise InputError(f"audio file {path} contains no samples; give a voice recording")
    return torch.from_numpy(np.concatenate(chunks)), int(rate)


def _integer_pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1): signed formats over 2^(bits-1); unsigned ones (8-bit WAV)
    are centred on 2^(bits-1) first, so silence is 0."""
    info = np.iinfo(samples.dtype)
    half = (float(info.max) + 1) / 2 if info.min == 0 else -float(info.min)
    centre = half if info.min == 0 else 0.0
    return ((samples.astype(np.float64) - centre) / half).astype(np.float32)


def to_16k_mono(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[T] or [C, T] at any rate -> mono float32 [T] at 16 kHz."""
    import torchaudio
    wave = waveform.float()
    if wave.dim() == 2:
        wave = wave.mean(dim=0)
    if sample_rate != C.AUDIO_SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, sample_rate, C.AUDIO_SAMPLE_RATE)
    return wave.contiguous()


def loudness_gain(wave: torch.Tensor) -> float:
    """The factor that brings `wave` to LOUDNESS_TARGET_DBFS RMS, never letting a peak exceed PEAK_LIMIT."""
    rms = wave.pow(2).mean().sqrt().item()
    if rms < 1e-8:
        return 1.0
    gain = 10 ** (LOUDNESS_TARGET_DBFS / 20) / rms
    return min(gain, PEAK_LIMIT / wave.abs().max().item())


def loudness_normalize(wave: torch.Tensor) -> torch.Tensor:
    return wave * loudness_gain(wave)


# ----------------------------------------------------------------------------- the model
def _heads_for(hidden: int) -> int:
    return {1024: 16, 768: 12}.get(hidden, max(1, hidden // 16))


def _config_from_state(state: dict[str, torch.Tensor]):
    """A Wav2Vec2Config matching a state dict that carries no config (ComfyUI's single file)."""
    from transformers import Wav2Vec2Config
    hidden = state["encoder.layer_norm.weight"].shape[0]
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    convs = sorted({int(k.split(".")[2]) for k in state if k.startswith("feature_extractor.conv_layers.")})
    conv_w = [state[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in convs]
    layer_norm_all = "feature_extractor.conv_layers.1.layer_norm.weight" in state
    pos = state["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]      # [hidden, hidden/groups, k]
    ffn = state["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0]
    return Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_heads_for(hidden),
        intermediate_size=ffn, conv_dim=[w.shape[0] for w in conv_w], conv_kernel=[w.shape[2] for w in conv_w],
        conv_stride=[5] + [2] * (len(conv_w) - 1), conv_bias="feature_extractor.conv_layers.0.conv.bias" in state,
        feat_extract_norm="layer" if layer_norm_all else "group", do_stable_layer_norm=layer_norm_all,
        num_conv_pos_embeddings=pos.shape[2], num_conv_pos_embedding_groups=hidden // pos.shape[1])


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read wav2vec2 weights ({exc}); the file may be truncated") from None


def _canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `wav2vec2.` prefix, drop the CTC / pre-training heads, unify weight-norm names."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("wav2vec2.")
        if key.startswith(UNUSED_HEADS):
            continue
        key = key.replace("conv.weight_g", "conv.parametrizations.weight.original0")
        key = key.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        out[key] = value
    return out


class AudioFeatureExtractor:
    """wav2vec2 hidden states of a 16 kHz voice, bucketed per 25 fps video frame."""

    def __init__(self, model, do_normalize: bool, device, dtype):
        self.model, self.do_normalize, self.device, self.dtype = model, do_normalize, torch.device(device), dtype

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=torch.float32) -> "AudioFeatureExtractor":
        """The HF folder `wav2vec2-large-xlsr-53-english/` or ComfyUI's `wav2vec2_large_english*.safetensors`."""
        from accelerate import init_empty_weights
        from transformers import Wav2Vec2Config, Wav2Vec2Model
        path = Path(path)
        if path.is_dir():
            weights = next((path / n for n in HF_WEIGHT_FILES if (path / n).exists()), None)
            if weights is None or not (path / "config.json").exists():
                raise CheckpointError(f"{path}: expected config.json and one of {HF_WEIGHT_FILES} "
                                      "(the wav2vec2-large-xlsr-53-english folder)")
            state = _canonical(_read_state(weights))
            config = Wav2Vec2Config.from_pretrained(str(path))
            pre = path / "preprocessor_config.json"
            do_normalize = json.loads(pre.read_text()).get("do_normalize", True) if pre.exists() else True
        elif path.is_file():
            weights = path
            state = _canonical(_read_state(path))
            if "encoder.layer_norm.weight" not in state:
                raise CheckpointError(f"{path}: key 'encoder.layer_norm.weight' missing; not a wav2vec2 checkpoint")
            config, do_normalize = _config_from_state(state), True
        else:
            raise CheckpointError(f"{path}: wav2vec2 folder or file not found")
        with init_empty_weights():
            model = Wav2Vec2Model(config)
        expected = model.state_dict()
        for key, value in state.items():
            if key not in expected:
                raise CheckpointError(f"{weights}: unexpected key {key!r} for wav2vec2")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise CheckpointError(f"{weights}: {key!r} has shape {list(value.shape)}, "
                                      f"expected {list(expected[key].shape)}")
        missing = [k for k in expected if k not in state and k != "masked_spec_embed"]
        if missing:
            raise CheckpointError(f"{weights}: {len(missing)} wav2vec2 keys missing, e.g. {missing[:3]}")
        state.setdefault("masked_spec_embed", torch.zeros(config.hidden_size))
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return cls(model.to(device).eval(), do_normalize, device, dtype)

    def check_fits_dit(self, cfg, path: str | Path) -> None:
        """The DiT's audio projection reads `cfg.audio_layers` hidden states (the embeddings and every
        layer) of width `cfg.audio_dim`; another wav2vec2 would fail only in the first block."""
        layers, width = self.model.config.num_hidden_layers + 1, self.model.config.hidden_size
        if (layers, width) != (cfg.audio_layers, cfg.audio_dim):
            raise CheckpointError(f"{path}: this wav2vec2 gives {layers} hidden states of width {width}, but the DiT "
                                  f"reads {cfg.audio_layers} of width {cfg.audio_dim}; use "
                                  "wav2vec2-large-xlsr-53-english (the folder inside Wan2.2-S2V-14B)")

    def normalize(self, wave16k: torch.Tensor) -> torch.Tensor:
        """Zero mean, unit variance over the whole recording (the processor's do_normalize)."""
        x = wave16k.float()
        return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7) if self.do_normalize else x

    @torch.no_grad()
    def hidden_states_30hz(self, wave16k: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """[T] -> all hidden states resampled to 30 Hz: [layers+1, int(T50·30/50), hidden]."""
        x = wave16k.float() if normalized else self.normalize(wave16k)
        out = self.model(x[None].to(self.device, self.dtype), output_hidden_states=True)
        states = torch.cat(out.hidden_states).float()                     # [L, T50, C]
        t50 = states.shape[1]
        t30 = int(t50 / C.WAV2VEC_RATE * C.AUDIO_FEATURE_RATE)
        return F.interpolate(states.transpose(1, 2), size=max(t30, 1), mode="linear",
                             align_corners=True).transpose(1, 2)

    def extract(self, wave16k: torch.Tensor) -> torch.Tensor:
        """Whole-file features per video frame [layers+1, hidden, N] with N = the video frames the
        audio covers (spec §3.2 bucketing)."""
        return bucket_per_video_frame(self.hidden_states_30hz(wave16k))

    def windows(self, wave16k: torch.Tensor) -> "FeatureWindows":
        return FeatureWindows(self, wave16k)


def bucket_per_video_frame(states30: torch.Tensor, first_frame: int = 0, count: int | None = None) -> torch.Tensor:
    """[L, T30, C] -> [L, C, count]: video frame i takes T30 index round(1.2·i); zeros past the end."""
    t30 = states30.shape[1]
    if count is None:
        count = math.ceil(t30 / (C.AUDIO_FEATURE_RATE / C.VIDEO_FPS))
    frames = np.arange(first_frame, first_frame + count)
    index = np.round(frames * C.AUDIO_FEATURE_RATE / C.VIDEO_FPS).astype(int)
    out = states30.new_zeros(states30.shape[0], states30.shape[2], count)
    valid = index < t30
    out[..., torch.from_numpy(valid)] = states30[:, torch.from_numpy(index[valid])].transpose(1, 2)
    return out


class FeatureWindows:
    """(first video frame, count) -> features [L, C, count], computed window by window.

    Short audio: the whole file at once (the official computation). Long audio: wav2vec2 runs on
    windows of WINDOW_SECONDS plus CONTEXT_SECONDS each side (normalised with whole-file
    statistics), and the 50 → 30 Hz interpolation is evaluated at exactly the positions the
    whole-file interpolation would use, so only the transformer's context differs."""

    def __init__(self, extractor: AudioFeatureExtractor, wave16k: torch.Tensor):
        self.extractor, self.wave = extractor, extractor.normalize(wave16k)     # stats of the whole file
        seconds = wave16k.numel() / C.AUDIO_SAMPLE_RATE
        self.whole = extractor.hidden_states_30hz(self.wave, normalized=True) if seconds <= WHOLE_FILE_SECONDS else None
        self.t50_total = wav2vec_frames(wave16k.numel())
        self.t30_total = int(self.t50_total / C.WAV2VEC_RATE * C.AUDIO_FEATURE_RATE)
        self.cache: tuple[int, torch.Tensor] | None = None     # (first 50 Hz frame held, states [L, n, C])

    def audio_frames_30hz(self) -> int:
        return self.whole.shape[1] if self.whole is not None else self.t30_total

    def _states50(self, frame50: int) -> tuple[int, torch.Tensor]:
        per_window = int(WINDOW_SECONDS * C.WAV2VEC_RATE)
        context = int(CONTEXT_SECONDS * C.WAV2VEC_RATE)
        window = (frame50 // per_window) * per_window
        base = max(0, window - context)
        if self.cache is None or self.cache[0] != base:
            hop = C.AUDIO_SAMPLE_RATE // C.WAV2VEC_RATE            # 320 samples per 50 Hz frame
            end = min(self.wave.numel(), (window + per_window + context + 1) * hop + WAV2VEC_CONV_KERNELS[0] * hop)
            out = self.extractor.model(self.wave[base * hop: end][None].to(self.extractor.device, self.extractor.dtype),
                                       output_hidden_states=True)
            self.cache = (base, torch.cat(out.hidden_states).float())
        return self.cache

    @torch.no_grad()
    def _state30(self, index30: int) -> torch.Tensor:
        position = index30 * (self.t50_total - 1) / max(1, self.t30_total - 1)   # align_corners=True
        low = int(math.floor(position))
        frac = position - low
        base, states = self._states50(low)
        i = min(low - base, states.shape[1] - 1)
        j = min(i + 1, states.shape[1] - 1)
        return states[:, i] * (1 - frac) + states[:, j] * frac

    def __call__(self, first_frame: int, count: int) -> torch.Tensor:
        if self.whole is not None:
            return bucket_per_video_frame(self.whole, first_frame, count)
        cfg = self.extractor.model.config
        out = torch.zeros(cfg.num_hidden_layers + 1, cfg.hidden_size, count)
        for column, frame in enumerate(range(first_frame, first_frame + count)):
            index30 = round(frame * C.AUDIO_FEATURE_RATE / C.VIDEO_FPS)      # half-to-even, like np.round
            if index30 < self.t30_total:
                out[..., column] = self._state30(index30)
        return out


def wav2vec_frames(samples: int) -> int:
    """Hidden states wav2vec2-large produces for `samples` at 16 kHz (its conv stack, ≈50 Hz)."""
    length = samples
    for kernel, stride in zip(WAV2VEC_CONV_KERNELS, WAV2VEC_CONV_STRIDES):
        length = max(0, (length - kernel) // stride + 1)
    return length


def clips_for_audio(wave16k_samples: int) -> int:
    """Clips the official code generates for an audio of this many 16 kHz samples (spec §3.2)."""
    t30 = int(wav2vec_frames(wave16k_samples) / C.WAV2VEC_RATE * C.AUDIO_FEATURE_RATE)
    return int(t30 / (C.FRAMES_PER_CLIP * C.AUDIO_FEATURE_RATE / C.VIDEO_FPS)) + 1


def write_tiny_wav2vec2(folder: str | Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random wav2vec2 in the HF folder layout (config.json, preprocessor_config.json,
    model.safetensors with the `wav2vec2.` prefix and a CTC head, like the published CTC model)."""
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_heads_for(hidden),
                            intermediate_size=2 * hidden, conv_dim=[16] * 7, feat_extract_norm="layer",
                            do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, vocab_size=32)
    model = Wav2Vec2ForCTC(config).eval()
    config.save_pretrained(str(folder))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
        "sampling_rate": C.AUDIO_SAMPLE_RATE}, indent=2))
    return folder


def write_tiny_wav2vec2_comfy(path: str | Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """The same tiny weights as ComfyUI's single file (no prefix, no CTC head, fp16)."""
    import tempfile

    from safetensors.torch import load_file, save_file
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_wav2vec2(tmp, hidden=hidden, layers=layers, seed=seed)
        state = _canonical(load_file(str(Path(tmp) / "model.safetensors")))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))
    return path
