"""A pipeline worker: one torch.distributed rank holding one layer range of the DiT (issue 5).

    python -m liveavatar_backend.parallel_worker

Started by `parallel.PipelineWorkers` (one per device of this host) or by torchrun on several
hosts; either way the rank, world size and rendezvous come from torchrun's environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and the controller's address from
LIVEAVATAR_CONTROLLER (host:port) with its key in LIVEAVATAR_AUTHKEY (hex). The controller sends
what to load and then one job at a time; rank 0 streams finished block latents back to it.

A failing worker reports the error to the controller and exits at once, so the other ranks' next
collective fails instead of waiting forever, and the controller ends them all.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
import traceback
from multiprocessing.connection import Client
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .errors import GenerationInterrupted

CONTROLLER_ENV = "LIVEAVATAR_CONTROLLER"
AUTHKEY_ENV = "LIVEAVATAR_AUTHKEY"
DEVICE_ENV = "LIVEAVATAR_DEVICE"                 # set by the controller; torchrun: cuda:LOCAL_RANK
MEMORY_CAP_ENV = "LIVEAVATAR_MEMORY_CAP_GB"      # optional per-process cap (benchmarks, tests)
AUDIO_PREFETCH_CLIPS = 2                         # rank 0 asks for this many clips of features ahead
LOAD_REPORTS_PER_RANK = 50                       # a rank's load moves the loader's bar in ~2 % steps


def send_message(conn, message) -> None:
    """Messages are tuples/dicts of numbers, strings and CPU tensors, written with torch.save."""
    buffer = io.BytesIO()
    torch.save(message, buffer)
    conn.send_bytes(buffer.getbuffer())


def recv_message(conn):
    """The other side of `send_message`; `weights_only` loading, so nothing is unpickled."""
    return torch.load(io.BytesIO(conn.recv_bytes()), weights_only=True)


def _device(local_rank: int) -> torch.device:
    if DEVICE_ENV in os.environ:
        return torch.device(os.environ[DEVICE_ENV])
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def load_stage_model(load: dict, rank: int, world: int, device: torch.device,
                     on_read: Callable[[int, int], None] | None = None):
    """The DiT parameters of this rank's layer range: from the checkpoint, or random (benchmarks).
    `on_read` hears (elements read, elements this rank reads in all) after each tensor read."""
    from . import block_ops
    from .config import DiTConfig
    from .loading import assemble_dit, dit_config_for, expected_shapes, load_dit
    from .lora import read_lora
    from .memory_budget import check_weights_fit, free_gpu_bytes, free_host_bytes
    from .memory_modes import memory_mode
    from .pipeline_schedule import stage_layers
    from .stage import stage_parameters

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if load["random"] is not None:
        from .fixtures import random_dit
        cfg = DiTConfig.wan_s2v_14b() if load["random"] == "14b" else DiTConfig.tiny()

        def make_part(wanted):
            return random_dit(cfg, device, dtype, keep=wanted)
    else:
        cfg = dit_config_for(Path(load["dit"]))

        def make_part(wanted):
            return load_dit(load["dit"], device=device, dtype=dtype, cfg=cfg, keep=wanted, on_read=read)
    layers = stage_layers(cfg.num_layers, world)[rank]
    keep = stage_parameters(cfg, layers, rank == 0, rank == world - 1)
    share = sum(math.prod(shape) for name, shape in expected_shapes(cfg).items() if keep(name))

    def read(elements: int) -> None:
        if on_read is not None:
            on_read(elements, share)
    if load.get("memory_mode"):                 # a checkpoint's load (benchmarks make random weights)
        free = free_gpu_bytes(device) if device.type == "cuda" else free_host_bytes()
        check_weights_fit(cfg, memory_mode(load["memory_mode"]), device, free, keep)
    lora = read_lora(load["lora"]) if load["random"] is None and load["lora"] is not None else None
    dit = assemble_dit(make_part, cfg, fp8=load["fp8"], lora=lora, lora_scale=load["lora_scale"],
                       lora_path=load["lora"], keep=keep, out_dtype=dtype)    # the LoRA checked whole, against every layer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if device.type == "cuda" and block_ops.compile_supported()[0]:   # the controller says why not
        block_ops.enable_compile()
    return dit


class ControllerLink:
    """Rank 0's side of the controller connection: audio features on demand, blocks out, stop in."""

    def __init__(self, conn, job_id: int, num_clips: int):
        self.conn, self.job_id, self.num_clips = conn, job_id, num_clips
        self.features: dict[int, torch.Tensor] = {}
        self.requested: set[int] = set()
        self.stop = False
        self.pending: list[tuple[int, torch.Tensor, object]] = []    # (block, host copy, ready event)

    def _request(self, clip: int) -> None:
        if clip < self.num_clips and clip not in self.requested:
            self.requested.add(clip)
            send_message(self.conn, ("audio", self.job_id, clip))

    def _pump(self, block: bool) -> None:
        while block or self.conn.poll():
            message = recv_message(self.conn)
            if message[0] == "stop" and message[1] == self.job_id:
                self.stop = True
            elif message[0] == "audio" and message[1] == self.job_id:
                self.features[message[2]] = message[3]
            block = False                            # (messages of an earlier, stopped job are dropped)

    def audio_features(self, first_frame: int, count: int) -> torch.Tensor:
        from . import constants as C
        clip = first_frame // C.FRAMES_PER_CLIP
        self._request(clip)
        for ahead in range(1, AUDIO_PREFETCH_CLIPS + 1):    # arrive while this clip runs
            self._request(clip + ahead)
        while clip not in self.features:
            self._pump(block=True)
        for old in [c for c in self.features if c < clip]:
            del self.features[old]
        offset = first_frame - clip * C.FRAMES_PER_CLIP
        return self.features[clip][..., offset: offset + count]

    def should_stop(self) -> bool:
        self._flush(wait=False)
        self._pump(block=False)
        return self.stop

    def emit_block(self, block: int, latents: torch.Tensor) -> None:
        """Copy to host without stalling the GPU queue; sent once the copy has landed."""
        if latents.is_cuda:
            host = torch.empty(latents.shape, dtype=latents.dtype, pin_memory=True)
            host.copy_(latents, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((block, host, event))
        else:
            self.pending.append((block, latents.clone(), None))
        self._flush(wait=False)

    def _flush(self, wait: bool) -> None:
        while self.pending:
            block, host, event = self.pending[0]
            if event is not None and not (wait or event.query()):
                return
            if event is not None:
                event.synchronize()
            send_message(self.conn, ("block", block, host))
            self.pending.pop(0)

    def finish(self) -> None:
        self._flush(wait=True)


class LoadReports:
    """Tells the controller how much of its share this rank has read: ("loading", rank, elements
    since the last report), about every LOAD_REPORTS_PER_RANK-th of the share."""

    def __init__(self, conn, rank: int):
        self.conn, self.rank, self.unreported = conn, rank, 0

    def __call__(self, elements: int, share: int) -> None:
        self.unreported += elements
        if self.unreported * LOAD_REPORTS_PER_RANK >= share:
            send_message(self.conn, ("loading", self.rank, self.unreported))
            self.unreported = 0


def serve(conn, rank: int, world: int, device: torch.device) -> None:
    from .pipeline import GenerationPlan
    from .stage import PipelineStage, StageJob

    load = recv_message(conn)
    dit = load_stage_model(load, rank, world, device, on_read=LoadReports(conn, rank))
    stage = PipelineStage(dit, rank, world, offload_caches=load["offload_caches"])
    dist.barrier()
    send_message(conn, ("ready", rank, torch.cuda.memory_allocated(device) if device.type == "cuda" else 0))
    while True:
        message = recv_message(conn)
        if message[0] == "quit":
            return
        if message[0] != "job":
            continue                                 # a stop that arrived after its job had ended
        spec = message[1]
        job = StageJob(GenerationPlan(**spec["plan"]), spec["text_states"], spec.get("ref_latent"),
                       spec.get("motion_latents"))
        link = ControllerLink(conn, spec["id"], job.plan.num_clips) if rank == 0 else None
        if link is not None:
            job.audio_features = lambda first, count: link.audio_features(first, count).to(device)
        try:
            report = stage.run(job, emit_block=link and link.emit_block, should_stop=link and link.should_stop)
        except GenerationInterrupted:
            send_message(conn, ("stopped", rank))
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if link is not None:
            link.finish()
        send_message(conn, ("done", rank, dict(dataclasses.asdict(report), bubble=report.bubble)))


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device(int(os.environ.get("LOCAL_RANK", rank)))
    host, port = os.environ[CONTROLLER_ENV].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY_ENV]))
    try:
        send_message(conn, ("hello", rank, world, str(device)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if MEMORY_CAP_ENV in os.environ:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(float(os.environ[MEMORY_CAP_ENV]) * 2**30 / total, device)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
        serve(conn, rank, world, device)
        dist.destroy_process_group()
        return 0
    except (EOFError, ConnectionError):
        return 1                                   # the controller went away: nothing to report to
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the controller
        kind = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
        try:
            send_message(conn, ("error", rank, f"{kind}: {exc}", traceback.format_exc(limit=6)))
        except Exception:
            pass
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
