import math

import pytest
import torch

from magnets.models.fsq import FSQ


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4], [7]])
def test_ids_codes_round_trip_over_every_code(levels):
    fsq = FSQ(levels)
    assert fsq.codebook_size == math.prod(levels) and fsq.dim == len(levels)
    ids = torch.arange(fsq.codebook_size)
    codes = fsq.ids_to_codes(ids)  # [V, d]
    assert torch.equal(fsq.codes_to_ids(codes), ids)
    assert len(torch.unique(codes, dim=0)) == fsq.codebook_size
    assert codes.min() >= -1 and codes.max() <= 1


@pytest.mark.parametrize("levels", [[8], [5], [2]])
def test_bound_reaches_exactly_the_levels(levels):
    fsq = FSQ(levels)
    z = torch.linspace(-20, 20, 4001)[:, None]  # [n, 1]
    digits = torch.unique(torch.round(fsq.bound(z)))
    half = levels[0] // 2
    assert digits.tolist() == list(range(-half, levels[0] - half))
    assert torch.round(fsq.bound(torch.zeros(1, 1))).item() == 0  # a zero latent is the middle level


def test_forward_shapes_zero_loss_and_straight_through_gradient():
    fsq = FSQ([8, 5, 5, 5])
    latents = torch.randn(2, 4, 3, 5, 5, requires_grad=True)
    codes, ids, loss = fsq(latents)
    assert codes.shape == latents.shape and ids.shape == (2, 3, 5, 5) and ids.dtype == torch.int64
    assert loss.item() == 0.0 and 0 <= ids.min() and ids.max() < 1000
    assert torch.equal(fsq.embed(ids), codes.detach()) and torch.equal(fsq.lookup(latents), ids)
    codes.sum().backward()
    # d code / d latent = tanh' * half_l / half_width > 0 everywhere: rounding does not block it.
    assert (latents.grad > 0).all()


def test_bad_levels_and_channels_are_clear_errors():
    with pytest.raises(ValueError, match="integers >= 2"):
        FSQ([8, 1])
    with pytest.raises(ValueError, match="uint16"):
        FSQ([16, 16, 16, 16, 2])
    with pytest.raises(ValueError, match=r"expects latents \[B, 3, \.\.\.\], got \[2, 4, 8\]"):
        FSQ([5, 5, 5]).lookup(torch.zeros(2, 4, 8))
