import pytest
import torch

from openmm_starmd.model.masks import slot_visibility


def _table(L, window=None):
    frame = torch.arange(L).repeat(2)
    noisy = torch.arange(2 * L) >= L
    return slot_visibility(frame[:, None], noisy[:, None], frame[None], noisy[None], window)


def test_block_causal_training_layout():
    L = 4
    vis = _table(L)
    for q in range(2 * L):
        for k in range(2 * L):
            qf, qn, kf, kn = q % L, q >= L, k % L, k >= L
            if not qn:  # clean query: clean keys of frames <= its own
                expected = (not kn) and kf <= qf
            else:  # noisy query: clean keys of earlier frames, and itself
                expected = ((not kn) and kf < qf) or (kn and kf == qf)
            assert bool(vis[q, k]) == expected, (q, k)


def test_every_slot_sees_itself():
    assert bool(_table(5).diagonal().all())
    assert bool(_table(5, window=1).diagonal().all())


@pytest.mark.parametrize("W", [1, 2, 3])
def test_window_keeps_the_last_W_usable_clean_frames(W):
    L = 6
    vis = _table(L, window=W)
    full = _table(L)
    for q in range(2 * L):
        qn = q >= L
        clean_seen = [k for k in range(L) if vis[q, k]]
        usable = [k for k in range(L) if full[q, k]]
        assert clean_seen == usable[-W:] if usable else clean_seen == []
        if qn:
            assert bool(vis[q, q])
    with pytest.raises(ValueError, match="window"):
        _table(3, window=0)
