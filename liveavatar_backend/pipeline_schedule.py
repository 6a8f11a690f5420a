"""The order in which a layer pipeline over N devices processes the work of one generation (issue 5).

Work items are (block k, denoising step i) plus the two sink prefills. Every device holds a
contiguous range of layers and processes the SAME sequence of items, one per tick: the item that
enters device 0 at tick t is on device r at tick t + r (a synchronous pipeline, so every send has
its receive in the same tick and the exchange cannot deadlock). What makes several items
independent enough to be in flight together:

* (k, i) needs (k, i-1) to have left the LAST device (its velocity gives (k, i)'s input latents),
  i.e. it enters device 0 at least N ticks after (k, i-1) did;
* (k, i) needs step i's cache to hold block k-1's keys at every layer: true whenever (k-1, i)
  comes earlier in the sequence, because every device runs the sequence in order;
* the rolling sink (spec §3.5) re-fills the cond region of every cache with latent 0 of clip 0:
  it comes after every item of clip 0 and before every item of clip 1, and needs block 0's last
  step to be back on device 0.

The scheduler is greedy: each tick, device 0 takes the most advanced ready step (finishing blocks
early keeps the first frame early), else leaves a bubble. With N = 1 it is the single-device order
(block by block, step by step); with N <= steps it has no bubbles in the steady state, because
the blocks in flight supply N independent items. Steps of later blocks may run ahead by at most
`N + 1` blocks, which bounds the latents and audio held in flight.
"""
from __future__ import annotations

import dataclasses

from . import constants as C


@dataclasses.dataclass(frozen=True)
class Denoise:
    block: int              # global block index: clip = block // 4
    step: int

    @property
    def clip(self) -> int:
        return self.block // C.BLOCKS_PER_CLIP

    @property
    def first_frame(self) -> int:
        """Latent frame where the block starts (F0 = 12·clip + 3·block_in_clip)."""
        return C.LATENTS_PER_BLOCK * self.block


@dataclasses.dataclass(frozen=True)
class Prefill:
    rolling: bool           # False: the portrait's reference latent; True: latent 0 of clip 0


Item = Denoise | Prefill


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Contiguous, nearly equal layer ranges, the longer ones first (device 0 also embeds, the last
    one also runs the head; both are small)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {stages} devices")
    base, extra = divmod(num_layers, stages)
    ranges, start = [], 0
    for r in range(stages):
        end = start + base + (1 if r < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges


def build_schedule(num_clips: int, steps: int, stages: int, rolling_sink: bool = True) -> list[Item | None]:
    """Items in the order they enter device 0; None is a tick in which device 0 idles (a bubble)."""
    if num_clips < 1 or steps < 1 or stages < 1:
        raise ValueError(f"need at least one clip, step and stage (got {num_clips}, {steps}, {stages})")
    num_blocks = num_clips * C.BLOCKS_PER_CLIP
    roll = rolling_sink and num_clips > 1
    max_lead = stages + 1
    entered: dict[tuple[int, int], int] = {}       # (block, step) -> tick it entered device 0
    next_block = [0] * steps                       # per step: the next block to run at that step
    order: list[Item | None] = [Prefill(rolling=False)]
    rolled = not roll

    def ready(block: int, step: int, tick: int) -> bool:
        if block >= num_blocks:
            return False
        if not rolled and block >= C.BLOCKS_PER_CLIP:
            return False                           # clip 1 waits for the rolling sink
        if step == 0:
            return block <= next_block[steps - 1] + max_lead
        previous = entered.get((block, step - 1))
        return previous is not None and tick >= previous + stages

    while next_block[steps - 1] < num_blocks:
        tick = len(order)
        if not rolled and all(b >= C.BLOCKS_PER_CLIP for b in next_block) \
                and tick >= entered[(0, steps - 1)] + stages:
            order.append(Prefill(rolling=True))
            rolled = True
            continue
        for step in reversed(range(steps)):
            block = next_block[step]
            if ready(block, step, tick):
                entered[(block, step)] = tick
                next_block[step] += 1
                order.append(Denoise(block, step))
                break
        else:
            order.append(None)
    return order


def item_at(order: list[Item | None], stage: int, tick: int) -> Item | None:
    """The item device `stage` processes at `tick` (entered device 0 `stage` ticks earlier)."""
    index = tick - stage
    return order[index] if 0 <= index < len(order) else None


def num_ticks(order: list[Item | None], stages: int) -> int:
    return len(order) + stages - 1


def bubble_fraction(order: list[Item | None], stages: int) -> float:
    """Share of a device's ticks without work (the pipeline's fill, drain and waits)."""
    return 1 - sum(item is not None for item in order) / num_ticks(order, stages)
