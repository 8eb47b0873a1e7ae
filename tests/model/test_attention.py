"""FullContext's grouped "joint" attention equals one dense SDPA under the full token mask."""
import pytest
import torch
import torch.nn.functional as F

from openmm_starmd.model.attention import FullContext
from openmm_starmd.model.masks import slot_visibility


def dense_reference(frame, noisy, valid, window, q, k, v):
    """The definition: every token against every token, masked by slot visibility and residue validity."""
    B, H, S, N, _ = q.shape
    vis = slot_visibility(frame[:, None], noisy[:, None], frame[None, :], noisy[None, :], window)
    mask = (vis[None, :, None, :, None] & valid[:, None, None, None, :]).expand(B, S, N, S, N).reshape(B, 1, S * N, S * N)
    out = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), attn_mask=mask, scale=1.0)
    return out.view(B, H, S, N, -1)


LAYOUTS = {
    # training: [clean 0..L-1, noisy 0..L-1]
    "training": ([0, 1, 2, 3, 0, 1, 2, 3], [0, 0, 0, 0, 1, 1, 1, 1]),
    # sampling without the cache: history then one noisy frame
    "rollout": ([0, 1, 2, 3], [0, 0, 0, 1]),
    # slots out of order
    "shuffled": ([2, 0, 1, 1, 0, 2], [1, 0, 0, 1, 1, 0]),
    # two clean copies of frame 0 (slots 0 and 3) see the same keys and form one group, so the
    # grouped output must be put back in slot order
    "regrouped": ([0, 1, 1, 0], [0, 0, 1, 0]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_joint_attention_equals_the_dense_mask(layout, window, padded):
    g = torch.Generator().manual_seed(0)
    frame = torch.tensor(LAYOUTS[layout][0])
    noisy = torch.tensor(LAYOUTS[layout][1], dtype=torch.bool)
    B, H, S, N, E, Ev = 3, 2, frame.shape[0], 5, 7, 4
    valid = torch.ones(B, N, dtype=torch.bool)
    if padded:
        valid[1, 3:] = False
        valid[2, 0] = False
    q, k = (torch.randn(B, H, S, N, E, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, S, N, Ev, generator=g, dtype=torch.float64, requires_grad=True)
    got = FullContext(frame, noisy, valid, window).attend(0, "joint", q, k, v)
    want = dense_reference(frame, noisy, valid, window, q, k, v)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and the gradients, which training uses
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    grads_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    grads_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_training_layout_never_scores_an_invisible_slot():
    """Each query slot's group holds exactly the key slots visibility allows (here L = 4: a clean
    frame f sees clean 0..f, a noisy frame f sees clean 0..f-1 and itself)."""
    frame = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    noisy = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    ctx = FullContext(frame, noisy, torch.ones(1, 2, dtype=torch.bool))
    x = torch.arange(8.0).view(1, 1, 8, 1, 1)
    seen = [k_sel(x).flatten().long().tolist() for _, k_sel, _, _ in ctx._groups]
    assert seen == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [4], [0, 5], [0, 1, 6], [0, 1, 2, 7]]
