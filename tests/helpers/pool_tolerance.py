"""How far two implementations of the pool's LoRA delta may differ in a bf16 call (`pool/delta.py`'s contract).

Each rounds `h = coef * (A x)` to bf16 before the expand, but sums `A x` in float32 in its own order: where a sum
falls next to a bf16 rounding boundary, the two may round it to neighbouring bf16 values, one spacing apart (at
most 2^-7 |h|). Each such h moves the token's delta by that spacing times its B row. The bound below is the sum of
those moves over every (pick, rank) at once, on top of the one rounding of the output and the float32 sum order
that the callers allow already. A wrong page, a missed pick or an unrounded h is off by far more where it matters.
"""

from __future__ import annotations

import torch

BF16_SPACING = 2.0**-7  # bf16 keeps 8 significant bits: neighbouring values are at most 2^-7 |h| apart


def h_rounding_slack(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, pages: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """`[T, N]` float64: `2^-7 * sum_q |h_q| @ |B[p_q]|` for a bf16 call, zeros for any other dtype."""
    T, K = pages.shape
    slack = torch.zeros(T, B.shape[2], dtype=torch.float64)
    if x.dtype != torch.bfloat16:
        return slack
    xs = x.double()
    for q in range(K):
        p = pages[:, q]
        used = p >= 0
        if not used.any():
            continue
        pq = p[used]
        h = torch.bmm(A[pq].double().nan_to_num(0.0), xs[used, :, None])[:, :, 0] * coef[used, q : q + 1].double()
        slack[used] += torch.bmm(h.abs()[:, None, :], B[pq].double().nan_to_num(0.0).abs())[:, 0]
    return slack * BF16_SPACING


def assert_close_up_to_h_rounding(
    got: torch.Tensor,
    want: torch.Tensor,
    slack: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    equal_nan: bool = False,
) -> None:
    """`torch.testing.assert_close(got, want, rtol, atol)`, each element allowed `slack` more (see the module)."""
    g, w = got.double(), want.double()
    if equal_nan:
        both = g.isnan() & w.isnan()
        assert torch.equal(g.isnan(), w.isnan()), "NaN in one result and not in the other"
        g, w = g.masked_fill(both, 0.0), w.masked_fill(both, 0.0)
    diff = torch.where(g == w, 0.0, (g - w).abs())  # equal infinities too
    excess = diff - (rtol * w.abs().nan_to_num(0.0, posinf=0.0) + atol + slack)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{int((excess > 0).sum())} of {excess.numel()} values differ by more than one output rounding and one bf16 "
        f"spacing of each h; worst at flat index {worst}: got {g.flatten()[worst].item()}, want "
        f"{w.flatten()[worst].item()}, slack {slack.flatten()[worst].item()}"
    )
