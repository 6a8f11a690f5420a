"""One device's share of a generation pipelined over layer ranges (issue 5).

Every device (a torch.distributed rank) holds the parameters of one contiguous layer range and the
KV caches of those layers only, so weights and caches both shrink as devices are added. All ranks
walk the same item sequence (`pipeline_schedule`), one item per tick; at the end of a tick rank r
sends its output to rank r+1 and the last rank sends the item's velocity back to rank 0, in one
batched P2P exchange (NCCL on GPUs, gloo on CPUs), so no send waits on a receive that is posted
later.

Rank 0 also owns what lives outside the layers: noise, the audio encoder, the patch embedding,
the Euler updates and the finished block latents. The last rank runs the head. Every piece of
arithmetic is the single-device code (`LiveAvatarDiT.prefill_sink / run_layers / unembed`), and
each rank sees its caches written in the same per-step order as a single device would, so the
result equals the single-device result.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import constants as C
from .errors import GenerationInterrupted
from .kv_cache import KVCacheBank
from .kv_offload import OffloadedKVCacheBank
from .model import LiveAvatarDiT
from .pipeline import GenerationPlan, clip_noise, reference_frame, sink_offset
from .pipeline_schedule import Denoise, Prefill, build_schedule, item_at, num_ticks, stage_layers
from .schedule import euler_step, flow_match_schedule

# modules every rank keeps (small: they give device/dtype, time modulation and text context)
SHARED_MODULES = ("patch_embedding.", "cond_encoder.", "text_embedding.", "time_embedding.",
                  "time_projection.", "trainable_cond_mask.")
FIRST_RANK_MODULES = ("frame_packer.", "casual_audio_encoder.")
LAST_RANK_MODULES = ("head.",)


def stage_parameters(cfg, layers: range, first: bool, last: bool) -> Callable[[str], bool]:
    """Which checkpoint keys the rank holding `layers` loads."""
    injectors = {j for j, layer in enumerate(cfg.audio_inject_layers) if layer in layers}

    def keep(name: str) -> bool:
        if name.startswith(SHARED_MODULES):
            return True
        if name.startswith("blocks."):
            return int(name.split(".")[1]) in layers
        if name.startswith("audio_injector."):
            return int(name.split(".")[2]) in injectors
        return (first and name.startswith(FIRST_RANK_MODULES)) or (last and name.startswith(LAST_RANK_MODULES))
    return keep


@dataclasses.dataclass
class StageJob:
    """What one rank needs for one generation; the rank-0 fields are None elsewhere."""
    plan: GenerationPlan
    text_states: torch.Tensor                         # umT5 states [L, 4096]
    ref_latent: torch.Tensor | None = None            # [16, 1, H8, W8]
    motion_latents: torch.Tensor | None = None        # [16, 19, H8, W8]
    audio_features: Callable[[int, int], torch.Tensor] | None = None   # (first video frame, count)
    rolling_sink: bool = True


@dataclasses.dataclass
class StageReport:
    ticks: int
    busy_ticks: int
    seconds: float
    peak_bytes: int
    compute_ms: float = 0.0           # median GPU time of this rank's share of one item
    tick_ms: float = 0.0              # median GPU time of a whole tick (compute + exchange + waiting)
    launch_ms: float = 0.0            # median CPU time to issue one tick

    @property
    def bubble(self) -> float:
        return 1 - self.busy_ticks / max(1, self.ticks)


class TickTimer:
    """CUDA events at the start of a tick, after the compute and after the exchange (GPU only)."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.ticks: list[list] = []

    def tick(self) -> list:
        marks = []
        if self.enabled:
            self.ticks.append(marks)
            self.mark(marks)
        return marks

    def mark(self, marks: list) -> None:
        if self.enabled:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)

    def medians(self) -> tuple[float, float]:
        """(compute ms, tick ms), medians over ticks after the first few (compilation, fill)."""
        rows = [(m[0].elapsed_time(m[1]), m[0].elapsed_time(m[2])) for m in self.ticks[len(self.ticks) // 4:]]
        if not rows:
            return 0.0, 0.0
        return statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)


class PipelineStage:
    def __init__(self, dit: LiveAvatarDiT, rank: int, world: int, *, offload_caches: bool = False):
        self.dit, self.rank, self.world = dit, rank, world
        self.layers = stage_layers(dit.cfg.num_layers, world)[rank]
        self.first, self.last = rank == 0, rank == world - 1
        self.offload_caches = offload_caches

    # ------------------------------------------------------------------------------ messages
    def _audio_rows(self) -> int:
        return C.LATENTS_PER_BLOCK * (self.dit.cfg.num_audio_token + 2)   # n+1 tokens + 1 global per frame

    def _message_shape(self, item, layout) -> tuple[int, int, int]:
        if isinstance(item, Prefill):
            return (1, layout.cond_len, self.dit.cfg.dim)
        return (1, layout.block_tokens + self._audio_rows(), self.dit.cfg.dim)

    def _pack(self, x, audio) -> torch.Tensor:
        tokens, glob = audio
        return torch.cat([x, tokens.reshape(1, -1, x.shape[-1]), glob.reshape(1, -1, x.shape[-1])], dim=1)

    def _unpack(self, message: torch.Tensor, block_tokens: int):
        n1 = self.dit.cfg.num_audio_token + 1
        x, tokens, glob = message.split([block_tokens, C.LATENTS_PER_BLOCK * n1, C.LATENTS_PER_BLOCK], dim=1)
        return x, (tokens.reshape(C.LATENTS_PER_BLOCK, n1, -1), glob.reshape(C.LATENTS_PER_BLOCK, -1))

    # ---------------------------------------------------------------------------------- run
    def run(self, job: StageJob, *, emit_block: Callable[[int, torch.Tensor], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> StageReport:
        """Process this rank's share of every item. Rank 0 calls `emit_block(block, latents)` for
        each finished block, in order, and decides (through `should_stop`) when all ranks stop."""
        dit, plan = self.dit, job.plan
        layout = plan.layout
        order = build_schedule(plan.num_clips, plan.steps, self.world, job.rolling_sink)
        ticks = num_ticks(order, self.world)
        timesteps, sigmas = flow_match_schedule(plan.steps)
        bank_type = OffloadedKVCacheBank if self.offload_caches else KVCacheBank
        bank = bank_type(layout, self.layers, plan.steps, dit.cfg.num_heads, dit.cfg.head_dim, dit.dtype, dit.device)
        self.text_kv = dit.text_context_kv(job.text_states, self.layers)
        self.latents: dict[int, torch.Tensor] = {}       # rank 0: block -> latents at its current step
        self.audio: dict[int, tuple] = {}                 # rank 0: block -> encoded audio tokens
        self.noise: dict[int, torch.Tensor] = {}          # rank 0: clip -> noise
        self.sink = job.ref_latent
        incoming = None
        busy, start = 0, time.perf_counter()
        timer, launch = TickTimer(dit.device), []
        if dit.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dit.device)
        try:
            with torch.no_grad():
                for tick in range(ticks):
                    cpu_start = time.perf_counter()
                    self._check_stop(should_stop, tick)
                    item = item_at(order, self.rank, tick)
                    out = None
                    marks = timer.tick()
                    if item is not None:
                        busy += 1
                        out = self._process(item, incoming, job, bank, timesteps)
                    timer.mark(marks)
                    incoming = self._exchange(order, tick, item, out, layout)
                    timer.mark(marks)
                    launch.append(time.perf_counter() - cpu_start)
                    returning = item_at(order, self.world - 1, tick)
                    if self.first and isinstance(returning, Denoise):
                        velocity = out if self.world == 1 else incoming.pop("velocity")
                        self._finish_step(returning, velocity, sigmas, plan, emit_block)
                    incoming = incoming.get("hidden")
        finally:
            bank.release()
            self.text_kv = None
            self.latents, self.audio, self.noise = {}, {}, {}
        if dit.device.type == "cuda":
            torch.cuda.synchronize(dit.device)
        peak = torch.cuda.max_memory_allocated(dit.device) if dit.device.type == "cuda" else 0
        compute_ms, tick_ms = timer.medians()
        return StageReport(ticks, busy, time.perf_counter() - start, peak, compute_ms, tick_ms,
                           1000 * statistics.median(launch) if launch else 0.0)

    def _check_stop(self, should_stop, tick: int) -> None:
        """Rank 0 decides; the flag goes to every rank over the CPU (gloo) path, so all stop on the same tick."""
        stop = bool(self.first and should_stop is not None and should_stop())
        if self.world > 1:
            flag = torch.tensor([int(stop)])
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if stop:
            raise GenerationInterrupted(f"stopped at pipeline tick {tick}")

    def _process(self, item, incoming, job: StageJob, bank, timesteps) -> torch.Tensor | None:
        dit, plan = self.dit, job.plan
        if isinstance(item, Prefill):
            if self.first:
                sink = self.sink if item.rolling else job.ref_latent
                x = dit.prefill_sink(sink, job.motion_latents, self.text_kv, bank, self.layers)
            else:
                x = dit.prefill_sink(None, None, self.text_kv, bank, self.layers, incoming)
            return None if self.last else x
        step, first_frame = item.step, item.first_frame
        if self.first:
            x = dit.embed_noisy(self._latents_for(item, job))
            audio = self.audio[item.block]
        else:
            x, audio = self._unpack(incoming, bank.layout.block_tokens)
        t = float(timesteps[step])
        ref_frame = reference_frame(first_frame, sink_offset(plan.seed, first_frame, step))
        tables = dit.rope_tables(first_frame, C.LATENTS_PER_BLOCK, ref_frame, bank.layout)
        cache = bank.step(step)
        x = dit.run_layers(x, self.layers, t, first_frame, tables, bank, cache, self.text_kv, audio)
        cache.advance(first_frame)
        if self.last:
            return dit.unembed(x, t, bank.layout)
        return self._pack(x, audio)

    def _latents_for(self, item: Denoise, job: StageJob) -> torch.Tensor:
        """Rank 0: the block's input latents (noise at step 0) and, at step 0, its audio tokens."""
        if item.step > 0:
            return self.latents[item.block]
        dit, clip = self.dit, item.clip
        if clip not in self.noise:
            self.noise = {clip: clip_noise(job.plan, clip, dit.device, dit.dtype)}
        within = item.block % C.BLOCKS_PER_CLIP
        latents = self.noise[clip][:, C.LATENTS_PER_BLOCK * within: C.LATENTS_PER_BLOCK * (within + 1)]
        feats = job.audio_features(C.FRAMES_PER_BLOCK * item.block, C.FRAMES_PER_BLOCK)
        self.audio[item.block] = dit.encode_audio_block(feats, C.AUDIO_HISTORY_FRAMES, C.MOTION_LATENTS)
        self.latents[item.block] = latents
        return latents

    def _finish_step(self, item: Denoise, velocity, sigmas, plan, emit_block) -> None:
        """Rank 0: the Euler update of a returned item; a block's last step makes it clean."""
        i = item.step
        latents = euler_step(self.latents[item.block], velocity, float(sigmas[i]), float(sigmas[i + 1]))
        if i < plan.steps - 1:
            self.latents[item.block] = latents
            return
        del self.latents[item.block], self.audio[item.block]
        if item.block == 0:
            self.sink = latents[:, :1]             # rolling sink: latent 0 of clip 0 (spec §3.5)
        if emit_block is not None:
            emit_block(item.block, latents)

    def _exchange(self, order, tick: int, item, out, layout) -> dict:
        """End of a tick: hidden states to the next rank, the velocity back to rank 0."""
        if self.world == 1:
            return {}
        ops, received = [], {}
        if not self.last and item is not None:
            ops.append(dist.P2POp(dist.isend, out.contiguous(), self.rank + 1))
        upcoming = item_at(order, self.rank, tick + 1)
        if not self.first and upcoming is not None:
            received["hidden"] = torch.empty(self._message_shape(upcoming, layout), dtype=self.dit.dtype,
                                             device=self.dit.device)
            ops.append(dist.P2POp(dist.irecv, received["hidden"], self.rank - 1))
        returning = item_at(order, self.world - 1, tick)
        if isinstance(returning, Denoise):
            if self.last:
                ops.append(dist.P2POp(dist.isend, out.contiguous(), 0))
            elif self.first:
                shape = (self.dit.cfg.out_dim, C.LATENTS_PER_BLOCK, layout.h * 2, layout.w * 2)
                received["velocity"] = torch.empty(shape, dtype=self.dit.dtype, device=self.dit.device)
                ops.append(dist.P2POp(dist.irecv, received["velocity"], self.world - 1))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return received
