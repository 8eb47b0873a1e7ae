import torch

from openmm_starmd.model.rope import apply_rope, rope_angles, rope_tables


def _score(q, k, pos_q, pos_k, dtype):
    """<rope(q at pos_q), rope(k at pos_k)> with pos = (residue, frame)."""
    res = rope_angles(torch.tensor([[pos_q[0], pos_k[0]]]), 2, 10_000.0)  # (1, 2, 2)
    fr = rope_angles(torch.tensor([pos_q[1], pos_k[1]]), 2, 1_000.0)  # (2, 2)
    cos, sin = rope_tables(res, fr, dtype)  # (1, 2, 2, 4)
    rq = apply_rope(q, cos[0, 0, 0], sin[0, 0, 0])
    rk = apply_rope(k, cos[0, 1, 1], sin[0, 1, 1])
    return (rq * rk).sum()


def test_logit_depends_only_on_relative_positions():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, generator=g, dtype=torch.float64)
    base = _score(q, k, (5, 2), (1, 0), torch.float64)
    shifted = _score(q, k, (5 + 37, 2 + 11), (1 + 37, 0 + 11), torch.float64)
    assert torch.allclose(base, shifted, atol=1e-12)
    # both axes matter
    assert not torch.allclose(base, _score(q, k, (6, 2), (1, 0), torch.float64))
    assert not torch.allclose(base, _score(q, k, (5, 3), (1, 0), torch.float64))


def test_large_frame_indices_keep_their_phase_in_float32():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 8, generator=g, dtype=torch.float64)
    ref = _score(q, k, (3, 1), (0, 0), torch.float64)
    far = _score(q.float(), k.float(), (3, 10**6 + 1), (0, 10**6), torch.float32)
    assert abs(far.item() - ref.item()) < 1e-5


def test_rotation_preserves_norm():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    cos, sin = rope_tables(rope_angles(torch.arange(5)[None], 4, 100.0), rope_angles(torch.arange(3), 4, 100.0), torch.float64)
    y = apply_rope(x, cos[0], sin[0])
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1))
