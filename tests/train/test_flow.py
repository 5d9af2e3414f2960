"""The flow-matching pieces against closed forms."""
import torch

from dsv.flow import euler_sample, interpolate


class PointMassVelocity(torch.nn.Module):
    """Exact velocity field when all data is the single point `c`: v(x, t) = (x - c) / t."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = c

    def forward(self, x, t, y):
        return (x - self.c) / t.view(-1, 1, 1, 1, 1)


def test_euler_sampler_reaches_the_data_point_along_straight_paths():
    c = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn(5, 2, 3, 4, 4, dtype=torch.float64)
    out = euler_sample(PointMassVelocity(c), noise, None, steps=7)
    torch.testing.assert_close(out, c.expand_as(out), rtol=0, atol=1e-6)  # straight paths: Euler is exact up to the fp32 time grid


def test_guidance_extrapolates_from_the_null_branch():
    c_cond, c_null = torch.randn(2, 1, 2, 2, 2, 2, dtype=torch.float64)

    class TwoPoints(torch.nn.Module):
        def forward(self, x, t, y):
            target = torch.where((y == 3).view(-1, 1, 1, 1, 1), c_null, c_cond)
            return (x - target) / t.view(-1, 1, 1, 1, 1)

    noise = torch.randn(4, 2, 2, 2, 2, dtype=torch.float64)
    out = euler_sample(TwoPoints(), noise, torch.zeros(4, dtype=torch.long), steps=5, cfg_scale=2.0, null_label=3)
    # v = v_null + 2 (v_cond - v_null) = (x - (2 c_cond - c_null)) / t: lands on 2 c_cond - c_null
    torch.testing.assert_close(out, (2 * c_cond - c_null).expand_as(out), rtol=0, atol=1e-6)


def test_interpolation_and_target():
    x0, noise, t = torch.randn(3, 2, 1, 2, 2), torch.randn(3, 2, 1, 2, 2), torch.rand(3)
    x_t, v = interpolate(x0, noise, t)
    torch.testing.assert_close(x_t, x0 + t.view(-1, 1, 1, 1, 1) * v)
    torch.testing.assert_close(v, noise - x0)
