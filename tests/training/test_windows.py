"""training/data.py: window sampling properties.

The sampler's statistics are checked on shards whose coordinates encode (frame, residue) so every
returned window can be traced back exactly; one test also runs on the real MD shard.
"""
from __future__ import annotations


import numpy as np
import pytest

from openmm_starmd.data import BackboneShard, TrajectoryError, read_backbone_trajectory
from training_helpers import load_training_module

data = load_training_module("data")


def _shard(name, n_frames, n_res, spacing=0.01, replica=0, chains=None):
    """Coordinates: x = frame index, y = residue index, z = atom slot, so windows are traceable."""
    f, r, a = np.meshgrid(np.arange(n_frames), np.arange(n_res), np.arange(4), indexing="ij")
    coords = np.stack([f, r, a], axis=-1).astype(np.float32)
    chain = np.zeros(n_res, int) if chains is None else np.asarray(chains)
    return BackboneShard(coords, spacing, "A" * n_res, np.arange(1, n_res + 1), chain,
                         [chr(65 + c) for c in range(chain.max() + 1)], np.ones(n_res, bool), name=name,
                         replica=replica)


def test_window_is_a_strided_slice_of_one_trajectory():
    s = data.WindowSampler([_shard("p", 1001, 12)], window=5, seed=0, fit=False)
    for _ in range(200):
        ex = s.sample_one()
        frames = ex["coords_nm"][:, 0, 0, 0]
        k = round(float(ex["dt_ns"]) / 0.01)
        assert k >= 1
        np.testing.assert_array_equal(np.diff(frames), k)
        assert frames[-1] < 1001
        assert ex["start_time_ns"] == pytest.approx((frames[0] + 1) * 0.01)


def test_dt_is_log_uniform_over_the_supported_range():
    """10 ns of 10 ps frames, L = 2: Δt spans 0.01..10 ns; each decade gets ~1/3 of draws."""
    s = data.WindowSampler([_shard("p", 1001, 3)], window=2, seed=1)
    dt = np.array([s.sample_one()["dt_ns"] for _ in range(3000)])
    assert dt.min() >= 0.01 - 1e-9 and dt.max() <= 10.0 + 1e-6
    decades = np.histogram(np.log10(dt), bins=[-2.0001, -1, 0, 1.0001])[0] / dt.size
    np.testing.assert_allclose(decades, 1 / 3, atol=0.04)


def test_dt_limited_by_trajectory_length_and_window():
    """101 frames, L = 5: largest stride 25 frames -> Δt ≤ 0.25 ns."""
    s = data.WindowSampler([_shard("p", 101, 3)], window=5, seed=2)
    dt = np.array([s.sample_one()["dt_ns"] for _ in range(500)])
    assert dt.max() <= 0.25 + 1e-6 and dt.max() > 0.2
    assert s.dt_support_ns(s.by_protein["p"][0].shard) == (0.01, pytest.approx(0.25))


def test_deterministic_given_seed():
    shards = [_shard("a", 300, 10), _shard("b", 500, 30, replica=0), _shard("b", 500, 30, replica=1)]
    a = data.WindowSampler(shards, window=4, max_residues=16, seed=5).sample(8)
    b = data.WindowSampler(shards, window=4, max_residues=16, seed=5).sample(8)
    c = data.WindowSampler(shards, window=4, max_residues=16, seed=6).sample(8)
    for key in ("coords_nm", "dt_ns", "mask", "residue_index"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["protein"] == b["protein"]
    assert not np.array_equal(a["coords_nm"], c["coords_nm"])


def test_crop_is_contiguous_and_padding_is_masked():
    shards = [_shard("small", 200, 10), _shard("big", 200, 40)]
    s = data.WindowSampler(shards, window=3, max_residues=16, seed=3)
    batch = s.sample(16)
    assert batch["coords_nm"].shape == (16, 3, 16, 4, 3)
    for i, name in enumerate(batch["protein"]):
        n = 10 if name == "small" else 16
        assert batch["mask"][i].sum() == n
        res = batch["coords_nm"][i, 0, :n, 0, 1]
        np.testing.assert_array_equal(np.diff(res), 1)  # contiguous residues
        np.testing.assert_array_equal(batch["residue_index"][i, :n], res)  # 0-based chain position
        assert (batch["coords_nm"][i, :, n:] == 0).all() and (batch["aatype"][i, n:] == 20).all()


def test_residue_index_restarts_per_chain():
    s = data.WindowSampler([_shard("ab", 50, 8, chains=[0, 0, 0, 1, 1, 1, 1, 1])], window=2, seed=0)
    ex = s.sample(1)
    assert ex["residue_index"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert ex["chain_index"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_proteins_sampled_uniformly_not_by_replica_count():
    shards = [_shard("one", 100, 3)] + [_shard("three", 100, 3, replica=r) for r in range(3)]
    s = data.WindowSampler(shards, window=2, seed=4)
    names = [s.sample_one()["protein"] for _ in range(2000)]
    assert abs(names.count("one") / 2000 - 0.5) < 0.05


def test_torch_output_types():
    torch = pytest.importorskip("torch")
    batch = data.WindowSampler([_shard("p", 100, 5)], window=3, seed=0).sample(2, as_torch=True)
    assert batch["coords_nm"].dtype == torch.float32 and tuple(batch["coords_nm"].shape) == (2, 3, 5, 4, 3)
    assert batch["aatype"].dtype == torch.int64 and batch["mask"].dtype == torch.bool


def test_too_few_frames_for_window():
    with pytest.raises(TrajectoryError, match=r"'p' r0: 3 frames, fewer than the window of 5"):
        data.WindowSampler([_shard("p", 3, 4)], window=5)


def test_no_supported_dt():
    """1 ps frames, 5 frames, dt_min 10 ps: stride ≥ 10 needed, only 4 possible."""
    with pytest.raises(TrajectoryError, match="supports no Δt"):
        data.WindowSampler([_shard("p", 5, 4, spacing=0.001)], window=2)


def test_on_real_md_shard(short_run):
    out = short_run["out"]
    shard = read_backbone_trajectory(str(out / "traj.dcd"), str(out / "topology.pdb"), frame_spacing_ns=0.0002,
                                     name="2M9I")
    s = data.WindowSampler([shard], window=4, dt_range_ns=(0.0002, 0.01), seed=0)
    batch = s.sample(4)
    assert batch["coords_nm"].shape == (4, 4, 34, 4, 3)
    assert np.isfinite(batch["coords_nm"]).all() and batch["mask"].all()
    ca_n = np.linalg.norm(batch["coords_nm"][..., 1, :] - batch["coords_nm"][..., 0, :], axis=-1)
    np.testing.assert_allclose(ca_n, 0.146, atol=0.01)  # N-CA bond length, nm


def _real_md_shard():
    import json

    from openmm_starmd.data import load_shard
    from training_helpers import TRAINING

    manifest = json.loads((TRAINING / "data" / "manifest.json").read_text())
    e = next(e for e in manifest["shards"] if e["protein"] == "neopetrosiamide")
    return load_shard(str(TRAINING / "data" / e["file"]), e["sha256"])


def test_fit_window_undoes_rigid_motion_exactly_and_keeps_internal_geometry():
    shard = _real_md_shard()
    x = shard.coords_nm[:4].astype(np.float64)
    rng = np.random.default_rng(0)
    moved = x.copy()
    for l in range(1, 4):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q *= np.sign(np.linalg.det(q))
        moved[l] = x[l] @ q + rng.normal(size=3)
    fit_raw = data.fit_window(x, shard.residue_mask)
    fit_moved = data.fit_window(moved, shard.residue_mask)
    np.testing.assert_allclose(fit_moved, fit_raw, atol=2e-5)  # the fit does not see rigid motion
    np.testing.assert_array_equal(fit_raw[0], x[0].astype(np.float32))
    d = lambda c: np.linalg.norm(c[:, :, None, 1] - c[:, None, :, 1], axis=-1)  # noqa: E731
    np.testing.assert_allclose(d(fit_raw), d(x), atol=2e-5)


def test_sampled_windows_are_fitted_and_move_far_less_than_raw_md():
    """Raw implicit-solvent MD tumbles; fitted windows keep only internal motion (as ATLAS's _fit.xtc)."""
    shard = _real_md_shard()

    def msd(fit):
        s = data.WindowSampler([shard], window=8, dt_range_ns=(0.01, 0.14), seed=3, fit=fit)
        out = []
        for _ in range(40):
            ca = s.sample_one()["coords_nm"][:, :, 1].astype(np.float64)
            out.append(((ca[1:] - ca[:-1]) ** 2).sum(-1).mean())
        return float(np.mean(out))

    raw, fitted = msd(False), msd(True)
    assert fitted < 0.5 * raw, (raw, fitted)


def test_min_window_serves_larger_dt_with_fewer_frames_and_pads_them():
    """101 frames at 10 ps, L = 8: full windows reach Δt 0.14 ns; min_window 4 reaches 0.33 ns, with
    as many frames as fit at the drawn stride, padded at the end with the last frame."""
    full = data.WindowSampler([_shard("p", 101, 3)], window=8, seed=2)
    assert full.dt_support_ns(full.by_protein["p"][0].shard) == (0.01, pytest.approx(0.14))
    s = data.WindowSampler([_shard("p", 101, 3)], window=8, seed=2, fit=False, min_window=4)
    assert s.dt_support_ns(s.by_protein["p"][0].shard) == (0.01, pytest.approx(0.33))
    lengths = {}
    for _ in range(400):
        ex = s.sample_one()
        frames = ex["coords_nm"][:, 0, 0, 0]
        k = round(float(ex["dt_ns"]) / 0.01)
        assert len(frames) == min(8, 100 // k + 1) >= 4  # as many as fit, never fewer than 4
        np.testing.assert_array_equal(np.diff(frames), k)
        assert frames[-1] <= 100
        lengths[len(frames)] = lengths.get(len(frames), 0) + 1
    assert {4, 8} <= set(lengths) and max(float(d) for d in [s.sample_one()["dt_ns"] for _ in range(300)]) > 0.25
    batch = s.sample(32)
    assert batch["coords_nm"].shape[1] == 8 and batch["frame_mask"].shape == (32, 8)
    for i in range(32):
        f = int(batch["frame_mask"][i].sum())
        assert batch["frame_mask"][i, :f].all() and f >= 4
        k = round(float(batch["dt_ns"][i]) / 0.01)
        assert f == min(8, 100 // k + 1)
        # padding repeats the last real frame (finite frames for the model, outside the loss)
        np.testing.assert_array_equal(batch["coords_nm"][i, f:], np.broadcast_to(batch["coords_nm"][i, f - 1],
                                                                                 batch["coords_nm"][i, f:].shape))
    with pytest.raises(ValueError, match="min_window=9"):
        data.WindowSampler([_shard("p", 101, 3)], window=8, min_window=9)
    with pytest.raises(TrajectoryError, match="3 frames, fewer than the window of 4"):
        data.WindowSampler([_shard("p", 3, 3)], window=8, min_window=4)


def test_full_windows_have_an_all_true_frame_mask():
    batch = data.WindowSampler([_shard("p", 300, 5)], window=5, seed=0).sample(6)
    assert batch["frame_mask"].all() and batch["frame_mask"].shape == (6, 5)


def test_short_dt_windows_never_span_a_reconstructed_restart():
    """A restart at frame 300 of 400 (as training/restore_md.py records it): windows below
    RESTART_MIN_DT_NS stay on one side, from both sides in proportion to their starts; windows at
    Δt ≥ 1 ns may span it; a shard without restarts is sampled exactly as before."""
    plain = _shard("p", 400, 6)
    marked = _shard("p", 400, 6)
    marked.provenance = {"restarts": [{"frame": 300, "kind": "reconstructed"}]}
    assert data.restart_segments(marked) == [(0, 300), (300, 400)] and data.restart_segments(plain) is None
    s = data.WindowSampler([marked], window=8, min_window=4, seed=3, fit=False)
    sides, spanning_long, short = [], 0, 0
    for _ in range(3000):
        ex = s.sample_one()
        frames = ex["coords_nm"][:, 0, 0, 0][ex["frame_mask"]] if "frame_mask" in ex else ex["coords_nm"][:, 0, 0, 0]
        spans = frames.min() < 300 <= frames.max()
        if float(ex["dt_ns"]) < data.RESTART_MIN_DT_NS - 1e-9:
            short += 1
            assert not spans, (frames, ex["dt_ns"])
            if round(float(ex["dt_ns"]) / 0.01) == 1:
                sides.append(frames[0] >= 300)
        else:
            spanning_long += spans
    assert short > 2000 and spanning_long > 0
    # stride 1, 8 frames: 293 starts before the restart, 93 after
    assert np.mean(sides) == pytest.approx(93 / (93 + 293), abs=0.06)
    # no restarts: identical draws to a sampler that never heard of them
    a = data.WindowSampler([plain], window=8, min_window=4, seed=5, fit=False)
    b = data.WindowSampler([plain], window=8, min_window=4, seed=5, fit=False, restart_min_dt_ns=0.0)
    for _ in range(50):
        np.testing.assert_array_equal(a.sample_one()["coords_nm"], b.sample_one()["coords_nm"])


def test_restart_free_window_shrinks_stride_only_when_no_stretch_is_long_enough():
    sh = _shard("p", 400, 6)
    sh.provenance = {"restarts": [{"frame": 250}]}
    s = data.WindowSampler([sh], window=4, min_window=4, seed=0, fit=False)
    t = s.by_protein["p"][0]
    k, start, n = s._within_segment(t, 99)  # 4 frames at stride 99 need 298 frames: longest stretch is 250
    assert k == 83 and n == 4 and start + 3 * k < 250
