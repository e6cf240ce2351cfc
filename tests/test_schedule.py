import math

import pytest
import torch

import tlora
from tlora.schedule import RankSchedule


def reference_rank(t, R, Rmin, a, T):
    t = min(max(t, 0), T)
    return min(math.floor(((T - t) / T) ** a * (R - Rmin)) + Rmin, R)


@pytest.mark.parametrize("R,Rmin", [(64, 1), (64, 32), (16, 4), (4, 1), (8, 8), (1, 1)])
@pytest.mark.parametrize("a", [0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("T", [1000, 100])
def test_formula_over_grid(R, Rmin, a, T):
    ts = list(range(0, T + 1, max(1, T // 97))) + [T - 1, T]
    got = tlora.active_ranks(ts, R, Rmin, a, T)
    assert got == [reference_rank(t, R, Rmin, a, T) for t in ts]
    for t, r in zip(ts, got):
        assert tlora.active_rank(t, R, Rmin, a, T) == r


def test_reference_table():
    # the paper's formula (the seed guide's rows for α != 1 are wrong)
    ts = [0, 250, 500, 750, 999]
    assert [tlora.active_rank(t, 64, 1, 1.0) for t in ts] == [64, 48, 32, 16, 1]
    assert [tlora.active_rank(t, 64, 1, 2.0) for t in ts] == [64, 36, 16, 4, 1]
    assert [tlora.active_rank(t, 64, 1, 0.5) for t in ts] == [64, 55, 45, 32, 2]
    assert [tlora.active_rank(t, 64, 32) for t in (0, 999)] == [64, 32]  # official recipe


def test_clamped_timesteps():
    assert tlora.active_rank(-5, 64) == 64
    assert tlora.active_rank(1500, 64, 1, 0.5) == 1  # LyCORIS fails here (complex power)
    assert tlora.active_rank(1000, 64, 3) == 3


@pytest.mark.parametrize("t,expected_b", [(500, 1), (500.0, 1), (torch.tensor(500), 1), (torch.tensor(500.5), 1),
                                           (torch.tensor([0, 500, 999]), 3), ([0.0, 999.0], 2),
                                           (torch.tensor([0.25, 0.5], dtype=torch.bfloat16) * 1000, 2)])
def test_rank_mask_inputs(t, expected_b):
    m = tlora.rank_mask(t, 16, 2)
    assert m.shape == (expected_b, 16) and m.dtype == torch.float32
    ts = [float(v) for v in torch.as_tensor(t, dtype=torch.float64).reshape(-1)]
    for row, tt in zip(m, ts):
        r = tlora.active_rank(tt, 16, 2)
        assert row[:r].eq(1).all() and row[r:].eq(0).all()


@pytest.mark.parametrize("kw,name", [(dict(min_rank=0), "min_rank"), (dict(min_rank=9), "min_rank"),
                                     (dict(exponent=0.0), "exponent"), (dict(exponent=-1.0), "exponent"),
                                     (dict(num_train_timesteps=0), "num_train_timesteps")])
def test_invalid_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        tlora.active_rank(10, 8, **kw)
    with pytest.raises(ValueError, match=name):
        tlora.rank_mask(10, 8, **kw)


def test_schedule_table():
    assert RankSchedule(64).table() == [(0, 64), (250, 48), (500, 32), (750, 16), (999, 1)]
