"""Loading every component once and running a whole generation: the API the CLI and the ComfyUI
nodes share.

    engine = LiveAvatarEngine.load(ModelSpec.from_folder(ckpt_dir, lora=lora_path), device="cuda")
    job = engine.prepare(portrait, audio_16k, prompt, size="384*256", num_clips=0, steps=4, seed=420)
    decoder = engine.decoder(job.decoder_warm_up)
    for clip_latents in engine.sample(job):
        frames = decoder.decode(clip_latents)       # [F, H, W, 3] in [0, 1]; or submit() / collect()
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import block_ops, fp8_attention
from . import constants as C
from .audio import AudioFeatureExtractor
from .clip_decoder import ClipDecoder
from .cuda_graphs import capture_blocked
from .errors import CheckpointError, InputError
from .fp8 import fp8_matmul_unavailable
from .image import preprocess_portrait
from .lora import read_lora
from .loading import LoadProgress, assemble_dit, dit_config_for, load_dit
from .memory_modes import AUTO, MemoryMode, memory_mode as memory_mode_by_name, resolve_auto, with_host_caches
from .parallel import PipelineWorkers, external_world, parse_devices
from .memory_budget import (cache_gpu_bytes, check_caches_fit, check_weights_fit, free_gpu_bytes, free_host_bytes,
                            host_cache_bytes, sampling_gpu_bytes)
from .pipeline import BlockSampler, Conditioning, GenerationPlan, ProgressEvent, plan_generation
from .sizes import parse_size
from .text import TextEncoder
from .vae import WanVAE

log = logging.getLogger("liveavatar")

# file and folder names of the published Wan2.2-S2V-14B repository (spec §1.1)
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where every component comes from, and how to hold it."""
    dit: Path                       # Wan2.2-S2V-14B folder, or a single DiT safetensors file
    text_encoder: Path
    tokenizer: Path | None          # None: read from a ComfyUI text-encoder file (spiece_model key)
    vae: Path
    audio_encoder: Path             # wav2vec2 folder or single file
    lora: Path | None = None
    lora_scale: float | None = None  # None: 0.5 (α/r of the official config) or the file's alpha

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> "ModelSpec":
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"checkpoint folder {folder} does not exist; download Wan-AI/Wan2.2-S2V-14B into it")
        paths = dict(dit=folder, text_encoder=folder / T5_FILE, tokenizer=folder / TOKENIZER_DIR,
                     vae=folder / VAE_FILE, audio_encoder=folder / WAV2VEC_DIR)
        paths.update({k: Path(v) if isinstance(v, (str, Path)) else v for k, v in overrides.items()})
        return cls(**paths)

    @classmethod
    def single_files(cls, dit: str | Path, *, text_encoder, vae, audio_encoder, lora=None,
                     tokenizer=None) -> "ModelSpec":
        """ComfyUI's repackaged files; the umT5 tokenizer then comes from the text-encoder file."""
        return cls(dit=Path(dit), text_encoder=Path(text_encoder), tokenizer=tokenizer and Path(tokenizer),
                   vae=Path(vae), audio_encoder=Path(audio_encoder), lora=lora and Path(lora))

    def check_files(self) -> None:
        for name in ("dit", "text_encoder", "tokenizer", "vae", "audio_encoder"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise CheckpointError(f"{path}: not found ({name.replace('_', ' ')}); see README 'Model files'")
        if self.lora is not None and not Path(self.lora).exists():
            raise CheckpointError(f"{self.lora}: LoRA file not found; download Quark-Vision/Live-Avatar "
                                  "liveavatar.safetensors")


@dataclasses.dataclass
class Job:
    """One prepared generation: its plan, its conditioning, and the latents that prime the decoder."""
    plan: GenerationPlan
    cond: Conditioning
    decoder_warm_up: torch.Tensor       # [1, 16, 7, H8, W8] static portrait latents (spec §3.7)


class LiveAvatarEngine:
    def __init__(self, dit, text_encoder, vae, audio_features, device, dtype, spec: ModelSpec, mode,
                 workers: PipelineWorkers | None = None, auto: bool = False):
        self.dit, self.text_encoder, self.vae, self.audio_features = dit, text_encoder, vae, audio_features
        self.device, self.dtype, self.spec, self.mode = torch.device(device), dtype, spec, mode
        self.workers = workers          # the DiT's layer ranges on several devices (then dit is None)
        self.auto = auto                # the mode came from memory_mode 'auto' (see `run_mode`)

    @classmethod
    def load(cls, spec: ModelSpec, device: str = "cuda", *, memory_mode: str = AUTO,
             report: Callable[[str], None] = log.info,
             progress: Callable[[float], None] | None = None) -> "LiveAvatarEngine":
        """Load and check every component; the LoRA is merged before any FP8 conversion.

        `device`: 'cuda', 'cuda:N', 'cpu'; a list of GPUs such as 'cuda:0,cuda:1' splits the DiT's
        layers over them (one worker process each, see `parallel.py`); 'external:N' waits for N
        workers started by torchrun, on this and other hosts.

        `memory_mode`: one of `memory_modes.MEMORY_MODES`, or 'auto' (chosen by the free memory of the
        first GPU, `memory_modes.resolve_auto`). On the GPU the DiT runs in bf16 (FP8 linears in the
        FP8 modes); on the CPU in float32. The text encoder stays in host memory (see `_encode_prompt`);
        wav2vec2 (1.3 GB in float32) sits on the GPU except in 'low_vram'.

        `progress` hears the fraction loaded (0..1, `loading.LoadProgress`); it may raise to stop."""
        spec.check_files()
        devices = parse_devices(device)
        sharded = len(devices) > 1 or external_world(devices) > 0
        device = home_device(devices)
        on_gpu = torch.device(device).type == "cuda"
        mode = _memory_mode(memory_mode, devices, report)
        if mode.fp8_attention:
            _check_fp8_attention(sharded, torch.device(device))
        dtype = torch.bfloat16 if on_gpu else torch.float32
        cfg = dit_config_for(Path(spec.dit))
        load_progress = LoadProgress(progress, cfg)
        dit = workers = None
        if sharded:
            report(f"loading DiT layer ranges on {', '.join(devices)}")
            workers = PipelineWorkers(devices, dict(dit=str(spec.dit), lora=spec.lora and str(spec.lora),
                                                    lora_scale=spec.lora_scale, fp8=mode.fp8_weights,
                                                    offload_caches=mode.offload_caches, random=None,
                                                    memory_mode=mode.name), report=report)
            workers.start(on_read=load_progress.dit_read)
        else:
            check_weights_fit(cfg, mode, device, free_gpu_bytes(device) if on_gpu else free_host_bytes())
            report(f"loading DiT from {spec.dit}" + (f", merging LoRA {spec.lora}" if spec.lora else "")
                   + (", converting to FP8 layer by layer" if mode.fp8_weights else ""))
            dit = assemble_dit(lambda keep: load_dit(spec.dit, device=device, dtype=dtype, cfg=cfg, keep=keep,
                                                     on_read=load_progress.dit_read), cfg,
                               fp8=mode.fp8_weights, lora=read_lora(spec.lora) if spec.lora else None,
                               lora_scale=spec.lora_scale, lora_path=spec.lora, out_dtype=dtype)
            if on_gpu:
                torch.cuda.empty_cache()      # the bf16 groups' memory, for the caches and the decoder
        try:
            load_progress.dit_done()
            report("loading text encoder, VAE and audio encoder")
            text, vae, audio = _load_encoders_and_vae(spec, mode, device, dtype, load_progress)
            audio.check_fits_dit(cfg, spec.audio_encoder)
            compile_ok, why_not = block_ops.compile_supported() if on_gpu else (False, "")
            if on_gpu and not compile_ok:
                report(f"torch.compile is off ({why_not}): eager PyTorch, ≈1.5x slower (README, Troubleshooting)")
            if compile_ok and dit is not None:
                block_ops.enable_compile()    # one graph per function for all layers (PERFORMANCE.md)
            graphs_blocked = capture_blocked() if on_gpu and dit is not None and not mode.offload_caches else None
            if graphs_blocked:
                report(f"CUDA graphs are off: {graphs_blocked} (README, Troubleshooting)")
            load_progress.done()
            return cls(dit, text, vae, audio, device, dtype, spec, mode, workers, auto=memory_mode == AUTO)
        except BaseException:
            if workers is not None:           # the DiT's ranks hold their layers: they end with the load
                workers.close()
            raise

    def close(self) -> None:
        """End the pipeline workers (a sharded DiT); a single-device engine has nothing to end."""
        if self.workers is not None:
            self.workers.close()

    # ------------------------------------------------------------------------------- parking
    @property
    def parkable(self) -> bool:
        """Whether `park` can free this engine's GPU: one GPU (a split DiT's layers live in its workers)."""
        return self.workers is None and self.device.type == "cuda"

    def gpu_weight_bytes(self) -> int:
        """Bytes of the weights `park` moves: the DiT's, the VAE's and the audio encoder's on the GPU."""
        return sum(t.numel() * t.element_size() for module in self._gpu_modules() for t in _weights_of(module))

    def park(self) -> None:
        """Move the weights on the GPU to host memory (pageable), so that ComfyUI's own models can have
        the GPU; `unpark` brings them back, with their layouts, for the next job. The umT5 weights
        already live in host memory; what stays on the GPU is small (the DiT's per-timestep
        modulation, the VAE's latent statistics, per-process library workspaces). Parking a parked
        engine again moves back whatever `unpark_vae` brought."""
        for module in self._gpu_modules():
            module.to("cpu")

    def unpark(self) -> None:
        for module in self._gpu_modules():
            module.to(self.device)

    def unpark_vae(self) -> None:
        """Bring back only the VAE (0.25 GB) of a parked engine, for a decode."""
        self.vae.model.to(self.device)

    def _gpu_modules(self) -> list[torch.nn.Module]:
        if not self.parkable:
            return []
        modules = [self.dit, self.vae.model]
        if self.audio_features.device.type == "cuda":          # low_vram runs wav2vec2 on the CPU
            modules.append(self.audio_features.model)
        return modules

    # ------------------------------------------------------------------------------- preparing
    def prepare(self, portrait, audio_16k: torch.Tensor, prompt: str, *, size: str, num_clips: int,
                steps: int, seed: int) -> Job:
        """Plan the run and compute everything that is fixed for it (text, portrait latents, audio)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt is empty; describe the scene (who, where, style) in a sentence")
        if audio_16k.dim() != 1 or audio_16k.numel() < C.AUDIO_SAMPLE_RATE // C.VIDEO_FPS:
            raise InputError("audio is empty or shorter than one video frame; give at least 0.1 s of speech")
        width, height = parse_size(size)
        image_h, image_w = _image_hw(portrait)
        features = self.audio_features.windows(audio_16k)    # (first frame, count) -> [L, C, count]
        plan = plan_generation(image_height=image_h, image_width=image_w, area=width * height,
                               audio_frames=features.audio_frames_30hz(), max_clips=num_clips, steps=steps, seed=seed)
        pixels = preprocess_portrait(portrait, plan.height, plan.width).to(self.device)   # [3, H, W]
        with torch.no_grad():
            static = self.vae.encode(pixels[None, :, None].expand(-1, -1, C.MOTION_FRAMES, -1, -1))[0]
            ref = static[:, :1]             # the first frame is encoded alone: = encoding the portrait itself
            motion = static[:, -C.MOTION_LATENTS:]
            text_states = self._encode_prompt(prompt)
            text_kv = self.dit.text_context_kv(text_states) if self.dit is not None else None
        cond = Conditioning(ref.to(self.dtype), motion.to(self.dtype), text_kv,
                            lambda first, count: features(first, count).to(self.device),
                            text_states=text_states if self.dit is None else None)
        return Job(plan, cond, motion[:, : C.WARM_UP_LATENTS][None])

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """umT5 states of the prompt. On the GPU the weights are copied in from pinned host memory
        for the call and the GPU copies simply dropped afterwards (nothing is copied back)."""
        if self.device.type != "cuda" or self.mode.offload_caches:
            return self.text_encoder.encode(prompt)
        tensors = _weights_of(self.text_encoder.model)
        host = [t.data for t in tensors]
        try:
            for tensor, on_host in zip(tensors, host):
                tensor.data = on_host.to(self.device, non_blocking=True)
            return self.text_encoder.encode(prompt)
        finally:
            for tensor, on_host in zip(tensors, host):
                tensor.data = on_host
            torch.cuda.empty_cache()

    def decoder(self, warm_up: torch.Tensor) -> ClipDecoder:
        """A fresh streaming decoder for one video, primed with the job's warm-up latents."""
        return ClipDecoder(self.vae, warm_up.to(self.device))

    def run_mode(self, plan: GenerationPlan) -> MemoryMode:
        """The mode a run of `plan` samples in: the engine's, except where 'auto' chose it and the run's
        caches cannot fit the GPU: then the same weights with the caches in host RAM, as in `low_vram`
        (`with_host_caches`), so that a size beyond the 384*256 preview that 'auto' judged by still
        runs: 704*384 in `balanced` on a 48 GB card, or in `quality` (46 GB of caches) on a card with
        less than that left beside the bf16 weights."""
        if not self.auto or self.mode.offload_caches:
            return self.mode
        need = self._cache_gpu_bytes(plan, self.mode)
        return self.mode if need is None or need <= free_gpu_bytes(self.device) else with_host_caches(self.mode)

    def sampling_gpu_bytes(self, plan: GenerationPlan) -> int | None:
        """GPU memory a generation adds on this engine's device (caches and working memory), or
        None where it is not estimated: on the CPU, and with the DiT's layers on worker processes
        (the first worker's share may sit on this GPU too; not counted)."""
        if self.workers is not None or self.device.type != "cuda":
            return None
        mode = self.run_mode(plan)
        return sampling_gpu_bytes(self.dit.cfg, plan, offload_caches=mode.offload_caches,
                                  fp8_attention=mode.fp8_attention, dtype=self.dtype)

    def cache_gpu_bytes(self, plan: GenerationPlan) -> int | None:
        """What a generation allocates on this engine's device before its first block (its caches
        and sink keys, exactly), or None where it is not estimated (as `sampling_gpu_bytes`)."""
        return self._cache_gpu_bytes(plan, self.run_mode(plan))

    def _cache_gpu_bytes(self, plan: GenerationPlan, mode: MemoryMode) -> int | None:
        if self.workers is not None or self.device.type != "cuda":
            return None
        return cache_gpu_bytes(self.dit.cfg, plan, offload_caches=mode.offload_caches,
                               fp8_attention=mode.fp8_attention, dtype=self.dtype)

    def check_fits(self, plan: GenerationPlan) -> None:
        """An InputError naming the size, steps and memory mode, and what to change, where the run's
        caches cannot fit the free GPU memory (or, offloaded, the host's): before anything is
        allocated, so the loaded model stays as it was, instead of an out-of-memory error part-way."""
        gpu_need = self.cache_gpu_bytes(plan)
        if gpu_need is None:
            return
        mode = self.run_mode(plan)
        host_need = host_cache_bytes(self.dit.cfg, plan, offload_caches=mode.offload_caches, dtype=self.dtype,
                                     pinned=True)
        check_caches_fit(mode, plan, self.device, gpu_need=gpu_need, gpu_free=free_gpu_bytes(self.device),
                         host_need=host_need, host_free=free_host_bytes() if host_need else None)

    def sample(self, job: Job, on_progress: Callable[[ProgressEvent], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               report: Callable[[str], None] = log.info) -> Iterator[torch.Tensor]:
        """Clean latents [16, 12, H8, W8] of each clip, on the CPU, as they are finished; `report`
        hears where 'auto' moves this run's caches (`run_mode`)."""
        if self.workers is not None:
            cond = job.cond
            yield from self.workers.sample(job.plan, cond.text_states, cond.ref_latent, cond.motion_latents,
                                           cond.audio_features, on_progress=on_progress, should_stop=should_stop)
            return
        on_gpu = self.device.type == "cuda"
        mode = self.run_mode(job.plan)              # the engine's own on the CPU
        if mode is not self.mode:                   # said first: the RAM check below may refuse the move
            report(f"memory_mode 'auto': size {job.plan.width}*{job.plan.height} at {job.plan.steps} steps does "
                   f"not fit {self.mode.name!r} on this GPU; its caches go to host RAM, as in 'low_vram'")
        self.check_fits(job.plan)
        sampler = BlockSampler(self.dit, job.plan, job.cond, offload_caches=mode.offload_caches and on_gpu,
                               cuda_graphs=on_gpu and not mode.offload_caches, fp8_attention=mode.fp8_attention)
        for clip in sampler.clips(on_progress=on_progress, should_stop=should_stop):
            yield clip.cpu()


def _load_encoders_and_vae(spec: ModelSpec, mode, device: str, dtype: torch.dtype,
                           load_progress: LoadProgress):
    """(umT5, Wan VAE, wav2vec2). umT5-XXL (11 GB in bf16) lives in host memory and visits the GPU only
    to encode a prompt (spec §4.3: the official single-GPU default offloads it too); low_vram encodes
    on the CPU."""
    on_gpu = torch.device(device).type == "cuda"
    encoder_device = device if on_gpu and not mode.offload_caches else "cpu"
    # page-locked: the per-prompt copy to the GPU runs at full bus speed
    text = TextEncoder.load(spec.text_encoder, spec.tokenizer, "cpu", dtype,
                            pin_memory=on_gpu and not mode.offload_caches, on_read=load_progress.text_encoder_read)
    load_progress.text_encoder_done()
    vae = _load_vae(spec, mode, device, dtype)
    load_progress.vae_done()
    audio = AudioFeatureExtractor.load(spec.audio_encoder, encoder_device, torch.float32)
    load_progress.audio_encoder_done()
    return text, vae, audio


def _load_vae(spec: ModelSpec, mode, device: str, dtype: torch.dtype) -> WanVAE:
    on_gpu = torch.device(device).type == "cuda"
    vae = WanVAE.load(spec.vae, device, dtype)
    vae.autotune_convs = on_gpu and not mode.offload_caches     # low_vram: no trial workspaces under its cap
    if on_gpu and not mode.offload_caches and block_ops.compile_supported()[0]:
        vae.enable_compile()          # 0.55x the VAE's time; low_vram keeps the smaller eager peak
    return vae


def _memory_mode(name: str, devices: list[str], report: Callable[[str], None]) -> MemoryMode:
    """The named mode, or 'auto' resolved by the free memory of the first local GPU (`resolve_auto`).
    Where a local GPU of `devices` has no FP8 matrix units, the FP8 modes keep their e4m3 weights and
    multiply them in bf16 (`fp8.WeightOnlyFP8`), which the report says ('fast' is refused later, by
    `_check_fp8_attention`)."""
    local_gpus = [] if external_world(devices) else [d for d in devices if torch.device(d).type == "cuda"]
    if name == AUTO:
        free = free_gpu_bytes(local_gpus[0]) if local_gpus else None
        mode = resolve_auto(free, len(devices))
        report(f"memory_mode 'auto': {mode.name}" + (f" ({free / 1e9:.1f} GB free on {local_gpus[0]})"
                                                      if local_gpus else ""))
    else:
        mode = memory_mode_by_name(name)
    no_fp8 = next(filter(None, map(fp8_matmul_unavailable, local_gpus)), None)
    if mode.fp8_weights and not mode.fp8_attention and no_fp8:
        report(f"{no_fp8}: memory_mode {mode.name!r} keeps the DiT's weights in FP8 and multiplies them in bf16 "
               "(FP8's memory, not its speed)")
    return mode


def home_device(devices: list[str]) -> str:
    """Where the encoders and the VAE live: the first device (with torchrun workers: this host's GPU)."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if external_world(devices) else devices[0]


class DecoderOnly:
    """The VAE alone, set up as `LiveAvatarEngine.load` sets it up: clips sampled earlier decode
    without loading the 14B DiT and the encoders again (the VAE is 0.25 GB)."""

    def __init__(self, vae: WanVAE):
        self.vae = vae

    @classmethod
    def load(cls, spec: ModelSpec, device: str = "cuda", *, memory_mode: str = AUTO) -> "DecoderOnly":
        """`device` and `memory_mode` as for `LiveAvatarEngine.load` (several devices: the first one)."""
        if not Path(spec.vae).exists():
            raise CheckpointError(f"{spec.vae}: not found (vae); see README 'Model files'")
        devices = parse_devices(device)
        device = home_device(devices)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return cls(_load_vae(spec, _memory_mode(memory_mode, devices, lambda message: None), device, dtype))

    def decoder(self, warm_up: torch.Tensor) -> ClipDecoder:
        """As `LiveAvatarEngine.decoder`."""
        return ClipDecoder(self.vae, warm_up.to(self.vae.device))


def _check_fp8_attention(sharded: bool, device: torch.device) -> None:
    """memory_mode 'fast' fails at load, before anything is read, where it cannot run as named."""
    if sharded:
        raise InputError("memory_mode 'fast' (FP8 attention) runs on one GPU; with several GPUs use 'balanced'")
    reason = fp8_attention.unavailable_on(device)
    if reason is not None:
        raise InputError(f"memory_mode 'fast' uses cuDNN's FP8 attention, but {reason}. "
                         "Choose 'balanced' (the same FP8 weights, bf16 attention).")


def _weights_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def _image_hw(portrait) -> tuple[int, int]:
    if isinstance(portrait, torch.Tensor):
        return int(portrait.shape[-3]), int(portrait.shape[-2])
    return portrait.height, portrait.width
