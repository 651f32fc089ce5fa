"""bind_rows: each row of a host model call gets its sample's factors (hyperalign.rows)."""

import pytest
import torch

from hyperalign import LoRAState, bind_rows


def factors(samples):
    """Sample s holds the value s everywhere, so a bound row names its sample."""
    down = torch.arange(samples, dtype=torch.float32).view(samples, 1, 1).expand(samples, 2, 3).contiguous()
    up = torch.arange(samples, dtype=torch.float32).view(samples, 1, 1).expand(samples, 4, 2).contiguous()
    return {"t": (down, up)}


@pytest.mark.parametrize(
    "rows, samples, expected",
    [(2, 2, [0, 1]), (4, 2, [0, 1, 0, 1]), (6, 3, [0, 1, 2, 0, 1, 2]), (3, 1, [0, 0, 0])],
)
def test_rows_get_their_samples_factors(rows, samples, expected):
    state = LoRAState()
    bind_rows(state, factors(samples), rows, samples)
    down, up = state._bound["t"]
    assert down[:, 0, 0].tolist() == expected and up[:, 0, 0].tolist() == expected


def test_one_row_per_sample_binds_the_factors_as_they_are():
    state, given = LoRAState(), factors(2)
    bind_rows(state, given, 2, 2)
    assert state._bound["t"][0] is given["t"][0]  # no index_select copy when the layouts already agree


def test_rows_that_do_not_split_into_samples_are_refused():
    with pytest.raises(ValueError, match="HyperAlign: a model call with 5 rows cannot be split into chunks of 2"):
        bind_rows(LoRAState(), factors(2), 5, 2)
