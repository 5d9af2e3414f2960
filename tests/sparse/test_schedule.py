"""Stage switching, profiling cadence and budgets follow the rules."""
import math

import torch

from dsv.ops.layout import CubePadding
from dsv.sparse.schedule import TwoStageSchedule, kept_density, real_key_blocks
from tests.sparse.helpers import sparse_config


def test_stage_two_starts_when_the_loss_is_low_after_min_dense_steps_and_a_profile():
    schedule = TwoStageSchedule(sparse_config(loss_threshold=0.1, min_dense_steps=10, max_dense_steps=100))
    schedule.observe_loss(0.01)
    assert not schedule.maybe_switch(9, profiled=True)  # too early
    assert not schedule.maybe_switch(10, profiled=False)  # not every layer profiled yet
    assert schedule.stage == 1
    assert schedule.maybe_switch(10, profiled=True)
    assert (schedule.stage, schedule.switch_step) == (2, 10)
    assert not schedule.maybe_switch(11, profiled=True)  # no way back, no second switch


def test_the_loss_is_smoothed_before_the_threshold_and_the_step_limit_forces_stage_two():
    schedule = TwoStageSchedule(sparse_config(loss_threshold=0.1, min_dense_steps=0, max_dense_steps=50))
    schedule.observe_loss(1.0)
    schedule.observe_loss(0.0)  # one low step: the EMA is 0.9
    assert math.isclose(schedule.loss_ema, 0.9)
    assert not schedule.maybe_switch(49, profiled=True)
    assert schedule.maybe_switch(50, profiled=False)


def test_profiling_is_frequent_early_and_rare_late():
    schedule = TwoStageSchedule(sparse_config(profile_every=25, profile_every_late=100, profile_until=200))
    due = [step for step in range(0, 501) if schedule.profile_due(step)]
    assert due == [0, 25, 50, 75, 100, 125, 150, 175, 200, 300, 400, 500]


def test_budgets_cover_tau_with_the_margin_within_the_density_bounds():
    schedule = TwoStageSchedule(sparse_config(budget_margin=1.5, min_density=0.05, max_density=0.5))
    fractions = torch.tensor([[0.01, 0.1, 0.2, 0.6], [float("nan"), 0.3, 0.04, 0.0]])
    want = torch.tensor([[0.05, 0.15, 0.3, 0.5], [0.5, 0.45, 0.06, 0.05]])
    torch.testing.assert_close(schedule.budgets(fractions), want)


def test_kept_density_rounds_counts_up_like_the_selection():
    assert kept_density(torch.tensor([0.1, 0.26]), num_blocks=10) == 0.2  # 1 and 3 blocks of 10
    assert kept_density(torch.tensor([0.001]), num_blocks=10) == 0.1  # at least one block


def test_kept_density_counts_only_blocks_that_hold_real_keys():
    """Grid (3, 4, 4) in cubes (4, 4, 4), blocks of 16: each cube's 48 real tokens fill 3 blocks, its
    4th block is padding only. A budget keeps ceil(budget x 4) blocks; of the 3 real ones at most 3."""
    padding = CubePadding((3, 4, 4), (4, 4, 4))
    assert padding.block_counts(16).tolist() == [16, 16, 16, 0]
    assert real_key_blocks(padding, 16, 4) == 3 and real_key_blocks(None, 16, 4) == 4
    assert kept_density(torch.tensor([0.25, 0.5]), 4, real_key_blocks(padding, 16, 4)) == 1.5 / 3  # 1 and 2 of 3
    assert kept_density(torch.tensor([1.0]), 4, 3) == 1.0  # every real block, not 4 / 3
    assert kept_density(torch.tensor([0.25, 0.5]), 4) == 1.5 / 4  # without padding: unchanged
