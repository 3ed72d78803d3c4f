"""ops.cache_advance against reference.cache_advance (exact: integers and flags; CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

from cqil_kernels.ops.cache_advance import cache_advance
from cqil_kernels.reference.cache_advance import cache_advance_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _state(B: int, S: int, seed: int):
    """A cache part-way through: random flags, token counts and position (as after earlier steps)."""
    g = torch.Generator().manual_seed(seed)
    key_valid = torch.rand(B, S, generator=g) < 0.7
    n_tokens = torch.randint(0, 50, (B,), generator=g)
    position = torch.randint(0, 9, (1,), generator=g).int()
    start = torch.full((1,), -5, dtype=torch.int32)  # stale: must be overwritten
    return [t.to(DEVICE) for t in (key_valid, n_tokens, position, start)]


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 5), (3, 37), (2, 1100), (33, 1), (40, 3), (5, 300)])
@pytest.mark.parametrize("masked", [False, True], ids=["all-real", "left-padded"])
def test_cache_advance_matches_twin(B, T, masked):
    S = T + 16
    g = torch.Generator().manual_seed(B * 1000 + T)
    valid = None
    if masked:  # left padding of a random length per row, plus a few holes
        pads = torch.randint(0, T + 1, (B,), generator=g)
        valid = (torch.arange(T)[None, :] >= pads[:, None]) & (torch.rand(B, T, generator=g) < 0.9)
        valid = valid.to(DEVICE)
    ours, twin = _state(B, S, T), _state(B, S, T)
    out = torch.full((B, T), -7, dtype=torch.int64, device=DEVICE)  # poisoned
    positions = cache_advance(valid, *ours, T, out=out)
    expected = cache_advance_ref(valid, *twin, T)
    assert positions.data_ptr() == out.data_ptr()
    torch.testing.assert_close(positions, expected, rtol=0, atol=0)
    for name, a, b in zip(("key_valid", "n_tokens", "position", "start"), ours, twin):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("B,T,tiles", [(1, 1, (1, 16)), (33, 1, (64, 16)), (40, 3, (64, 16)), (5, 300, (2, 512)),
                                       (2, 1100, (1, 1024)), (100, 1, (64, 16))])
def test_rows_are_taken_as_tiles(B, T, tiles):
    """Which [BLOCK_B, BLOCK_T] tile a shape gets: a decode batch's rows in one tile (of at most TILE flags)."""
    from cqil_kernels.ops.cache_advance import _tile

    assert (_tile(B, T)["BLOCK_B"], _tile(B, T)["BLOCK_T"]) == tiles


def test_consecutive_steps_continue_each_other():
    """A prefill then decode steps: positions continue from n_tokens, slots from position."""
    B, S = 2, 24
    ours = [torch.zeros(B, S, dtype=torch.bool, device=DEVICE), torch.zeros(B, dtype=torch.int64, device=DEVICE),
            torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE)]
    valid = torch.tensor([[False, False, True, True, True], [True] * 5], device=DEVICE)
    assert cache_advance(valid, *ours, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    for step in range(3):
        assert cache_advance(None, *ours, 1).tolist() == [[3 + step], [5 + step]]
        assert int(ours[3]) == 5 + step and int(ours[2]) == 6 + step
    assert ours[0][:, :8].tolist() == [[False, False] + [True] * 6, [True] * 8]
    assert ours[0][:, 8:].any().item() is False
    assert ours[1].tolist() == [6, 8]


def test_bad_input_is_refused():
    key_valid, n_tokens, position, start = _state(2, 8, 0)
    with pytest.raises(TypeError, match="key_valid"):
        cache_advance(None, key_valid.int(), n_tokens, position, start, 1)
    with pytest.raises(TypeError, match="n_tokens"):
        cache_advance(None, key_valid, n_tokens.int(), position, start, 1)
    with pytest.raises(ValueError, match="n_tokens must be"):
        cache_advance(None, key_valid, n_tokens[:1], position, start, 1)
    with pytest.raises(TypeError, match="start must be"):
        cache_advance(None, key_valid, n_tokens, position.long(), start, 1)
    with pytest.raises(ValueError, match="T must be"):
        cache_advance(None, key_valid, n_tokens, position, start, 9)
    with pytest.raises(ValueError, match="T must be"):
        cache_advance(None, key_valid, n_tokens, position, start, 0)
    with pytest.raises(TypeError, match="valid must be a bool"):
        cache_advance(torch.ones(2, 3, device=DEVICE), key_valid, n_tokens, position, start, 3)
    with pytest.raises(ValueError, match="valid must be"):
        cache_advance(torch.ones(2, 4, dtype=torch.bool, device=DEVICE), key_valid, n_tokens, position, start, 3)
    with pytest.raises(ValueError, match="out must be"):
        cache_advance(None, key_valid, n_tokens, position, start, 3, out=torch.empty(2, 3, device=DEVICE))
