"""ops.argmax against reference.argmax (torch.argmax): exact indices (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

from cqil_kernels.ops._common import ticket_counters
from cqil_kernels.ops.argmax import row_argmax
from cqil_kernels.reference.argmax import row_argmax_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,V", [(1, 1), (1, 97), (3, 1000), (5, 4099), (2, 49152)])
def test_row_argmax_matches_torch(dtype, B, V):
    torch.manual_seed(B * 7 + V)
    logits = (4 * torch.randn(B, V)).to(DEVICE, dtype)
    out = row_argmax(logits, out=torch.full((B,), -1, dtype=torch.int64, device=DEVICE))
    assert torch.equal(out, row_argmax_ref(logits))
    assert int(ticket_counters(logits.device, B)[:B].abs().sum()) == 0  # back at zero for the next launch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_nan_and_infinities_follow_torch(dtype):
    V = 1500  # several chunks in the interpreter (256 entries each)
    rows = torch.full((7, V), -3.0)
    rows[0, [900, 17, 1400]] = 5.0                          # tie across chunks: the lowest index
    rows[1, [300, 301]] = float("inf")                      # tie of +inf
    rows[2, 1200], rows[2, 5] = float("nan"), float("inf")  # NaN beats +inf
    rows[3, [1300, 700]] = float("nan")                     # the first NaN
    rows[4] = float("-inf")                                 # all -inf: index 0
    rows[5, :] = -1.0
    rows[5, 1499], rows[5, 3] = 0.0, -0.0                   # -0.0 == 0.0: the first of them
    rows[6, :] = -float("nan")                              # negative NaNs are NaNs too: index 0
    logits = rows.to(DEVICE, dtype)
    expected = row_argmax_ref(logits.cpu().float())
    assert row_argmax(logits).tolist() == expected.tolist()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="dimensions"):
        row_argmax(torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="not supported"):
        row_argmax(torch.zeros(2, 3, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="V = 0"):
        row_argmax(torch.zeros(2, 0, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        row_argmax(torch.zeros(3, 2, device=DEVICE).t())
    with pytest.raises(ValueError, match="out must be"):
        row_argmax(torch.zeros(2, 3, device=DEVICE), out=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    assert row_argmax(torch.zeros(0, 5, device=DEVICE)).shape == (0,)
