"""LiveAvatarModelLoader: every model file of Live Avatar, loaded once and reused across prompts."""
from __future__ import annotations

import functools
import gc
import logging
import traceback
from typing import Callable

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..liveavatar_backend.clip_decoder import ClipDecoder
from ..liveavatar_backend.engine import DecoderOnly, LiveAvatarEngine, ModelSpec
from ..liveavatar_backend.memory_budget import decode_gpu_bytes, free_host_bytes
from ..liveavatar_backend.memory_modes import AUTO, MEMORY_MODE_CHOICES
from ..liveavatar_backend.parallel import external_world, parse_devices
from . import paths
from .status import NodeStatus

log = logging.getLogger("liveavatar")
LiveAvatarModel = io.Custom("LIVEAVATAR_MODEL")
HOST_RAM_KEPT_FREE = 4e9          # parking the model in host RAM leaves this much to the system and ComfyUI


class LoadedModel:
    """What a LIVEAVATAR_MODEL carries: the engine, which ComfyUI may unload ("Unload Models", "Free
    model and node cache", an out-of-memory error, --disable-smart-memory) and which loads itself
    again, from the same files, the next time a node uses it; when one of ComfyUI's own models needs
    the GPU, its GPU weights wait in host RAM instead where there is room (`give_way`). One model set
    is loaded at a time (14B does not fit twice): loading one unloads whichever other handle holds
    its engine.

    The decoders need only the VAE: while the engine is unloaded they load the VAE alone (0.25 GB)
    instead of the whole set (17-33 GB), e.g. when only a decode setting changed after an unload."""

    def __init__(self, key: tuple, load: Callable[[], LiveAvatarEngine],
                 load_decoder: Callable[[], DecoderOnly] | None = None):
        self.key = key
        self._load = load
        self._load_decoder = load_decoder
        self._engine: LiveAvatarEngine | None = None
        self._decoder_only: DecoderOnly | None = None
        self.parked = False                         # the engine's GPU weights wait in host RAM (`give_way`)
        self._parked_vae_back = False               # ...but its VAE came back for a decode

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def engine(self) -> LiveAvatarEngine:
        if self._engine is not None and self.parked:
            self._unpark()
        if self._engine is None:
            self._make_current()
            if self._decoder_only is not None:      # the engine brings its own VAE
                self._decoder_only = None
                _free_memory()
            try:
                self._engine = self._load()
            except BaseException as failure:       # a bad file, an out-of-memory error, an interrupt
                # the frames of the failed load hold what it had read (up to 33 GB) for as long as
                # the exception lives, which ComfyUI keeps for its error report: free them now (the
                # report keeps its file and line numbers; only the frames' variables go)
                traceback.clear_frames(failure.__traceback__)
                try:
                    _free_memory()
                except Exception:                   # e.g. after a CUDA error: the load's error is the one to see
                    log.exception("freeing the memory of a failed load failed")
                raise
        return self._engine

    def decoder(self, warm_up: torch.Tensor, height: int, width: int) -> ClipDecoder:
        """A streaming decoder for frames of height×width, primed with `warm_up`: the engine's VAE if it
        is loaded (of a parked engine, only the VAE returns to the GPU), else the VAE alone; ComfyUI's
        own models make room for the decode first."""
        parked = self._engine is not None and self.parked
        if parked:
            source = self._engine
        elif self._engine is not None or self._load_decoder is None:
            source = self.engine()
        else:
            if self._decoder_only is None:
                self._make_current()
                self._decoder_only = self._load_decoder()
            source = self._decoder_only
        make_room(source.vae.device, decode_gpu_bytes(height, width))     # the VAE's weights included
        if parked:
            source.unpark_vae()
            self._parked_vae_back = True
        return source.decoder(warm_up)

    def _make_current(self) -> None:
        global _current
        if _current is not self:
            unload_current()
            _current = self

    def give_way(self) -> None:
        """Free this handle's GPU memory for ComfyUI's models: the engine's GPU weights move to host RAM
        where it has room for them (they come back when a node next uses the engine, a copy over the
        bus; reading the files again takes 18-50 s, docs/PERFORMANCE.md), else the engine is unloaded."""
        if self._engine is None or not self._engine.parkable:
            return self.unload()
        need = 0 if self.parked else self._engine.gpu_weight_bytes()      # parked: at most its VAE is back
        free = free_host_bytes()
        if free is None or free < need + HOST_RAM_KEPT_FREE:
            log.info("Live Avatar: %.1f GB of host RAM free, %.1f GB needed to keep the model there: unloading it",
                     (free or 0) / 1e9, (need + HOST_RAM_KEPT_FREE) / 1e9)
            return self.unload()
        try:
            self._engine.park()
        except BaseException as failure:           # e.g. host RAM ran out after all: the files are still there
            log.exception("moving the Live Avatar model to host RAM failed; unloading it")
            self._drop_after(failure)
            if not isinstance(failure, Exception):  # an interrupt goes on once the half-moved model is gone
                raise
            return
        self.parked, self._parked_vae_back = True, False
        _free_memory()
        log.info("Live Avatar model moved to host RAM (%.1f GB); it returns to %s when a node next uses it",
                 need / 1e9, self._engine.device)

    def _unpark(self) -> None:
        make_room(self._engine.device, self._engine.gpu_weight_bytes() * 1.1)
        try:
            self._engine.unpark()
        except BaseException as failure:            # out of memory half-way: the files are still there
            self._drop_after(failure)
            raise
        self.parked = self._parked_vae_back = False

    def _drop_after(self, failure: BaseException) -> None:
        """Unload a model that a failed move left half on the GPU. The failure's frames hold it too,
        and ComfyUI keeps the exception for its report: clear them, as a failed load's."""
        traceback.clear_frames(failure.__traceback__)
        self.unload()

    def devices(self) -> set[torch.device]:
        """The devices on which this handle holds memory now, named as ComfyUI names them."""
        if self._engine is not None and self.parked:
            names = [self._engine.device] if self._parked_vae_back else []
        elif self._engine is not None:
            names = [self._engine.device] + (self._engine.workers.devices if self._engine.workers else [])
        elif self._decoder_only is not None:
            names = [self._decoder_only.vae.device]
        else:
            names = []
        return {comfyui_device(name) for name in names if not str(name).startswith("external:")}

    def unload(self) -> None:
        engine, decoder_only = self._engine, self._decoder_only
        self._engine = self._decoder_only = None
        self.parked = self._parked_vae_back = False
        if engine is None and decoder_only is None:
            return
        if engine is not None:
            engine.close()                          # ends the pipeline workers of a sharded model
        del engine, decoder_only
        _free_memory()
        log.info("Live Avatar model unloaded; it loads again when a node next uses it")


def _free_memory() -> None:
    """Hand the memory of what was just dropped back (reference cycles included) to the device."""
    gc.collect()
    mm.soft_empty_cache()


_current: LoadedModel | None = None                  # the handle whose engine may be loaded


def current_model(key: tuple, load: Callable[[], LiveAvatarEngine],
                  load_decoder: Callable[[], DecoderOnly] | None = None) -> LoadedModel:
    """The model set for `key`: the one kept if the key matches, else a new one (the old one unloaded,
    before the new one reads any file)."""
    global _current
    if _current is None or _current.key != key:
        unload_current()
        _current = LoadedModel(key, load, load_decoder)
    return _current


def unload_current() -> None:
    if _current is not None:
        _current.unload()


def follow_comfyui_unloads() -> None:
    """Make ComfyUI's `unload_all_models` unload this pack's model too. Its model management does not
    know the engine (it is not one of ComfyUI's model patchers), so without this the buttons that
    free VRAM would leave 17-33 GB on the GPU. ComfyUI calls it outside any `try` in its prompt
    loop, so a failure here is logged, never raised. Installed once, at import."""
    original = mm.unload_all_models
    if getattr(original, "unloads_liveavatar", False):
        return

    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        try:
            unload_current()
        except Exception:
            log.exception("unloading the Live Avatar model failed")
        return original(*args, **kwargs)

    unload_all_models.unloads_liveavatar = True
    mm.unload_all_models = unload_all_models


_making_room_for_this_pack = False     # set while `make_room` asks ComfyUI for room for this pack


def give_way_to_comfyui_models() -> None:
    """Make ComfyUI's `free_memory` free this pack's GPU memory when ComfyUI's own models need it:
    when ComfyUI loads a model (or its VAE, an upscaler...) it first unloads its own models there until
    enough is free; if that is not enough while this pack holds 17-33 GB there, this pack's model
    leaves too (`LoadedModel.give_way`: to host RAM where it fits, as ComfyUI's own models do, else
    unloaded). Without this ComfyUI would squeeze its model into what is left, or run out of memory.
    With --disable-smart-memory ComfyUI unloads all its models before loading one, so this pack's
    leaves as well. Requests this pack makes for itself (`make_room`) never move it. Installed once."""
    original = mm.free_memory
    if getattr(original, "yields_to_comfyui", False):
        return

    @functools.wraps(original)
    def free_memory(memory_required, device, *args, **kwargs):
        unloaded = original(memory_required, device, *args, **kwargs)
        try:
            if _comfyui_needs_the_memory(memory_required, device):
                log.info("ComfyUI needs %s on %s for its own models: the Live Avatar model leaves it",
                         _gb(memory_required), device)
                _current.give_way()
        except Exception:                        # ComfyUI's load goes on either way
            log.exception("freeing the Live Avatar model's GPU memory for ComfyUI's models failed")
        return unloaded

    free_memory.yields_to_comfyui = True
    mm.free_memory = free_memory


def _comfyui_needs_the_memory(memory_required: float, device) -> bool:
    if _making_room_for_this_pack or _current is None or comfyui_device(device) not in _current.devices():
        return False
    return mm.DISABLE_SMART_MEMORY or mm.get_free_memory(device) < memory_required


def _gb(size: float) -> str:
    return "all its memory" if size >= 1e20 else f"{size / 1e9:.1f} GB"


follow_comfyui_unloads()
give_way_to_comfyui_models()


def make_room(device: str | torch.device, required_bytes: float) -> None:
    """Ask ComfyUI to move its own models (those other workflows left on the GPU) off `device` until
    `required_bytes` are free there. ComfyUI does not count this pack's memory, so it would keep
    them and the Live Avatar model or its caches would run out of memory instead. On the CPU this
    only updates ComfyUI's books (its models stay in RAM either way)."""
    global _making_room_for_this_pack
    _making_room_for_this_pack = True
    try:
        mm.free_memory(required_bytes, comfyui_device(device))
    finally:
        _making_room_for_this_pack = False


def comfyui_device(device: str | torch.device) -> torch.device:
    """`device` as ComfyUI names it: GPUs with their index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _devices(devices: str) -> str:
    """'auto' -> ComfyUI's device; otherwise one device or a comma-separated list of GPUs."""
    text = devices.strip()
    if text in ("", "auto"):
        return str(mm.get_torch_device())
    parse_devices(text)            # an InputError (a ValueError) naming the bad entry and the fix
    return text


class LiveAvatarModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarModelLoader",
            display_name="Live Avatar Model Loader",
            category="LiveAvatar",
            description="Loads Wan2.2-S2V-14B with the Live Avatar LoRA merged, plus its text encoder, VAE "
                        "and audio encoder. Loaded once; changing any setting reloads.",
            inputs=[
                io.Combo.Input("checkpoint", options=paths.checkpoint_choices(),
                               tooltip="The Wan2.2-S2V-14B folder in models/liveavatar/, or a repackaged "
                                       "wan2.2_s2v_14B file in models/diffusion_models/."),
                io.Combo.Input("lora", options=paths.lora_choices(), default="liveavatar.safetensors",
                               tooltip="The Live Avatar LoRA (liveavatar.safetensors, 4-step distilled). "
                                       "Without it the model is the plain Wan2.2-S2V and needs many steps."),
                io.Combo.Input("memory_mode", options=list(MEMORY_MODE_CHOICES), default=AUTO,
                               tooltip="auto: picked at each load by the GPU's free memory: quality from 49 GB "
                                       "free, balanced from 33 GB, else low_vram (the node and the log say which); "
                                       "a size whose caches do not fit moves them to host RAM. quality: bf16 weights; "
                                       "balanced: FP8 weights (a slight quality change; 32 instead of 48 GB at "
                                       "384*256); fast: FP8 weights and FP8 attention (one Hopper or "
                                       "newer GPU, pip install nvidia-cudnn-frontend; a larger quality change); "
                                       "low_vram: FP8 + attention caches in host RAM (19 GB at 384*256: 24 GB "
                                       "cards; on GPUs before Ada, such as an RTX 3090, the FP8 weights are "
                                       "multiplied in bf16). See the README for the VRAM and speed of each."),
                io.String.Input("devices", default="auto",
                                tooltip="'auto' (ComfyUI's device), 'cpu', 'cuda:N', or several GPUs such as "
                                        "'cuda:0,cuda:1': the DiT's layers are split over them (each holds "
                                        "its share of weights and caches; 2 GPUs run about twice as fast). "
                                        "The encoders and the VAE stay on the first."),
                io.Combo.Input("text_encoder", options=paths.component_choices("text_encoders"),
                               tooltip="umT5-XXL encoder; default: models_t5_umt5-xxl-enc-bf16.pth in the "
                                       "checkpoint folder, or a umt5_xxl file from models/text_encoders/."),
                io.Combo.Input("vae", options=paths.component_choices("vae"),
                               tooltip="Wan2.1 VAE; default: Wan2.1_VAE.pth in the checkpoint folder, or "
                                       "wan_2.1_vae from models/vae/."),
                io.Combo.Input("audio_encoder", options=paths.component_choices("audio_encoders"),
                               tooltip="wav2vec2-large-xlsr-53-english; default: the folder inside the "
                                       "checkpoint folder, or wav2vec2_large_english from models/audio_encoders/."),
            ],
            outputs=[LiveAvatarModel.Output(display_name="model", tooltip="The loaded model set, for the sampler "
                                                                          "and the decoders.")],
        )

    @classmethod
    def execute(cls, checkpoint, lora, memory_mode, devices, text_encoder, vae, audio_encoder) -> io.NodeOutput:
        settings = (checkpoint, lora, memory_mode, devices, text_encoder, vae, audio_encoder)
        model = current_model(settings, lambda: _load_engine(*settings), lambda: _load_decoder_only(*settings))
        model.engine()                          # loads now (or again), so that a bad file fails at this node
        return io.NodeOutput(model)


def _spec(checkpoint, lora, text_encoder, vae, audio_encoder) -> ModelSpec:
    folder = paths.resolve_checkpoint(checkpoint)
    overrides = {name: p for name, p in (
        ("text_encoder", paths.resolve_component("text_encoders", text_encoder)),
        ("vae", paths.resolve_component("vae", vae)),
        ("audio_encoder", paths.resolve_component("audio_encoders", audio_encoder))) if p is not None}
    if folder.is_dir():
        return ModelSpec.from_folder(folder, lora=paths.resolve_lora(lora), **overrides)
    missing = [n for n in ("text_encoder", "vae", "audio_encoder") if n not in overrides]
    if missing:
        raise ValueError(f"{', '.join(missing)}: the checkpoint {checkpoint!r} is a single file, so pick "
                         "the matching files (umt5_xxl, wan_2.1_vae, wav2vec2_large_english) explicitly")
    return ModelSpec.single_files(folder, lora=paths.resolve_lora(lora), **overrides)


def _load_engine(checkpoint, lora, memory_mode, devices, text_encoder, vae, audio_encoder) -> LiveAvatarEngine:
    """The engine for the loader's settings, after ComfyUI's own models have left its devices."""
    spec = _spec(checkpoint, lora, text_encoder, vae, audio_encoder)
    device = _devices(devices)
    names = parse_devices(device)
    if not external_world(names):        # 17-33 GB of weights, then the caches: all of ComfyUI's models go
        for name in names:
            make_room(name, float("inf"))
    return LiveAvatarEngine.load(spec, device=device, memory_mode=memory_mode, report=NodeStatus(),
                                 progress=_load_progress_bar())


LOAD_BAR_STEPS = 100


def _load_progress_bar() -> Callable[[float], None]:
    """The load's fractions on the running node's progress bar; Cancel stops the load there."""
    bar = comfy.utils.ProgressBar(LOAD_BAR_STEPS)

    def show(fraction: float) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(round(fraction * LOAD_BAR_STEPS))
    return show


def _load_decoder_only(checkpoint, lora, memory_mode, devices, text_encoder, vae, audio_encoder) -> DecoderOnly:
    """The loader's VAE alone, on the device the engine would put it on."""
    spec = _spec(checkpoint, lora, text_encoder, vae, audio_encoder)
    log.info(f"loading the VAE alone from {spec.vae} to decode (the rest loads when the sampler runs)")
    return DecoderOnly.load(spec, device=_devices(devices), memory_mode=memory_mode)
