"""The distilled flow-match Euler schedule (spec §3.6).

The official pipeline builds diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
shift=3)`, calls `set_timesteps(steps)` and takes one Euler step per timestep. We compute the same
numbers here in a few lines instead of depending on diffusers' scheduler at run time; the tests
check them against the spec's table and, bit for bit, against diffusers itself.

Two details of that scheduler shape the numbers:
* the low end of the grid is the training grid's smallest sigma, which is *already* shifted, and
  the shift is applied again on top, so the last timestep is 8.9286 and not 0 or 2.994;
* the training sigmas are float32 (so is that low end), the inference grid is computed in float64
  and stored as float32; timesteps are float32 sigmas × 1000.
"""
from __future__ import annotations

import operator

import torch

from .errors import InputError

NUM_TRAIN_TIMESTEPS = 1000  # wan_shared_cfg.num_train_timesteps (configs/shared_config.py), spec §3.6
SHIFT = 3.0                 # hard-coded shift=3 in causal_s2v_pipeline.py's generate(); --sample_shift is ignored

# The LoRA was distilled for the 4-step grid (1000, 857.7, 602.2, 8.9). 2 and 3 steps run in the
# official single-GPU code and make fast, lower-quality previews: their grids are not subsets of
# the 4-step one, so they are out of distribution. More than 4 steps crash the official code (it
# builds exactly 4 per-step KV caches); our cache bank is sized by the step count and could run
# them, but a 4-step distilled model gains nothing from extra off-grid steps and there is no
# official behaviour to match, so we refuse them.
SUPPORTED_STEPS = (2, 3, 4)
DISTILLED_STEPS = 4


def validate_steps(steps: int) -> int:
    """Return `steps` as an int, or raise InputError unless it is one of SUPPORTED_STEPS."""
    count = _step_count(steps)
    if count not in SUPPORTED_STEPS:
        raise InputError(
            f"steps {steps!r} is not supported; use 4 (what the Live Avatar LoRA was distilled for) "
            f"or 2 / 3 for faster, lower-quality previews")
    return count


def _step_count(steps) -> int | None:
    """An integer step count (Python or numpy int, not bool), else None."""
    if isinstance(steps, bool):
        return None
    try:
        return operator.index(steps)
    except TypeError:
        return None


def _shift_sigmas(sigmas):
    """The resolution-independent shift of flow matching: σ' = s·σ / (1 + (s − 1)·σ)."""
    return SHIFT * sigmas / (1 + (SHIFT - 1) * sigmas)


def _training_sigma_range() -> tuple[float, float]:
    """(σ_max, σ_min) of the 1000-step training grid t = 1000 … 1, shifted, in float32."""
    ends = torch.tensor([float(NUM_TRAIN_TIMESTEPS), 1.0], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    sigma_max, sigma_min = _shift_sigmas(ends).tolist()
    return sigma_max, sigma_min


def flow_match_schedule(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps] float32 on the 0–1000 scale, sigmas [steps + 1] float32 ending in 0).

    The model is conditioned on the timesteps; the Euler update uses the sigmas."""
    count = _step_count(steps)
    if count is None or count < 1:
        raise InputError(f"steps {steps!r}: the schedule needs a whole number of steps, at least 1")
    steps = count
    sigma_max, sigma_min = _training_sigma_range()
    start, stop = sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS
    # evenly spaced in float64 the way numpy.linspace does it: start + i·step, last one exact
    grid = torch.arange(steps, dtype=torch.float64)
    if steps > 1:
        grid = grid * ((stop - start) / (steps - 1)) + start
        grid[-1] = stop
    else:
        grid = grid + start
    sigmas = _shift_sigmas(grid / NUM_TRAIN_TIMESTEPS).to(torch.float32)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x + (σ_next − σ)·v, as diffusers' scheduler.step computes it; returned in x's dtype.

    The sum is taken in float32. The step size σ_next − σ is a float32 number and the product
    (σ_next − σ)·v follows torch's type promotion, so with a bf16 velocity it is rounded to bf16
    before the float32 add, exactly as in the official run (bit-identical there)."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return (x.to(torch.float32) + dt * velocity).to(x.dtype)
