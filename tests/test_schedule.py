"""The distilled flow-match schedule and Euler step (spec §3.6), against the spec's table and diffusers."""
from __future__ import annotations

import pytest
import torch

from liveavatar_backend.errors import InputError
from liveavatar_backend.schedule import (
    NUM_TRAIN_TIMESTEPS, SHIFT, SUPPORTED_STEPS, euler_step, flow_match_schedule, validate_steps)

# spec §3.6 (computed with diffusers 0.42.1)
SPEC_TIMESTEPS = {
    4: [1000, 857.6923, 602.1506, 8.9286],
    3: [1000, 751.1211, 8.9286],
    2: [1000, 8.9286],
    5: [1000, 900.3591, 751.1211, 502.985, 8.9286],
}
SPEC_SIGMAS = {
    4: [1.0, 0.857692, 0.602151, 0.008929, 0.0],
    3: [1.0, 0.751121, 0.008929, 0.0],
    2: [1.0, 0.008929, 0.0],
}


@pytest.mark.parametrize("steps", sorted(SPEC_TIMESTEPS))
def test_timesteps_match_the_spec_table(steps):
    timesteps, sigmas = flow_match_schedule(steps)
    assert timesteps.dtype == torch.float32 and timesteps.shape == (steps,)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert timesteps.tolist() == pytest.approx(SPEC_TIMESTEPS[steps], abs=5e-5)
    assert sigmas[-1].item() == 0.0
    assert torch.equal(timesteps, sigmas[:-1] * 1000)


@pytest.mark.parametrize("steps", sorted(SPEC_SIGMAS))
def test_sigmas_match_the_spec_table(steps):
    _, sigmas = flow_match_schedule(steps)
    assert sigmas.tolist() == pytest.approx(SPEC_SIGMAS[steps], abs=5e-7)


def test_low_end_is_shifted_twice():
    # training grid: 1/1000 shifted once = 0.002994; the inference grid ends there, shifted again
    once = SHIFT * 0.001 / (1 + (SHIFT - 1) * 0.001)
    twice = SHIFT * once / (1 + (SHIFT - 1) * once)
    assert flow_match_schedule(4)[1][-2].item() == pytest.approx(twice, rel=1e-6)
    assert NUM_TRAIN_TIMESTEPS == 1000 and SHIFT == 3


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 40])
def test_bit_identical_to_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)
    scheduler.set_timesteps(steps)
    timesteps, sigmas = flow_match_schedule(steps)
    assert torch.equal(timesteps, scheduler.timesteps)
    assert torch.equal(sigmas, scheduler.sigmas)


def test_euler_step_in_float32():
    x = torch.tensor([0.5, -1.0, 2.0])
    v = torch.tensor([1.0, 2.0, -4.0])
    out = euler_step(x, v, 0.857692301273346, 0.602150559425354)
    dt = torch.tensor(0.602150559425354) - torch.tensor(0.857692301273346)      # float32
    assert out.dtype == torch.float32
    assert torch.equal(out, x + dt * v)
    assert out.tolist() == pytest.approx([0.5 - 0.255542, -1.0 - 0.511084, 2.0 + 1.022167], abs=1e-6)


def test_last_step_lands_on_the_clean_estimate():
    # with sigma_next = 0 the step is x − σ·v, the flow-matching prediction of the clean sample
    x, v = torch.randn(4, 8), torch.randn(4, 8)
    _, sigmas = flow_match_schedule(4)
    out = euler_step(x, v, sigmas[3], sigmas[4])
    assert torch.allclose(out, x - sigmas[3] * v, atol=1e-7)


def test_euler_step_bf16_returns_bf16_and_matches_diffusers_bit_for_bit():
    diffusers = pytest.importorskip("diffusers")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 8, generator=generator).to(torch.bfloat16)
    v = torch.randn(2, 16, 3, 8, 8, generator=generator).to(torch.bfloat16)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)
    scheduler.set_timesteps(4)
    _, sigmas = flow_match_schedule(4)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        ours = euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, expected)
        x = ours
    # and the result is not simply x: the update really happened
    assert not torch.equal(euler_step(x, v, 1.0, 0.5), x)


def test_supported_steps_and_validation():
    assert SUPPORTED_STEPS == (2, 3, 4)
    for steps in SUPPORTED_STEPS:
        assert validate_steps(steps) == steps
    for bad in (0, 1, 5, 40, -4, 4.0, "4", True, None):
        with pytest.raises(InputError, match="distilled"):
            validate_steps(bad)


def test_schedule_rejects_non_positive_counts():
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError):
            flow_match_schedule(bad)
