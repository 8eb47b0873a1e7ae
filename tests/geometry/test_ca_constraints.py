"""Cα bounds (SHAKE-like projection): MD frames untouched, perturbed ones brought inside every
bound, rigid-motion equivariance, gaps and cis peptides of the start respected."""
import numpy as np
import pytest
import torch

from openmm_starmd.data import load_shard
from openmm_starmd.geometry import so3
from openmm_starmd.geometry.ca_constraints import (CHAIN_CA_RANGE_NM, MIN_NONBONDED_CA_NM, build_ca_constraints,
                                                   project_ca)
from pathlib import Path

SHARD = Path(__file__).resolve().parents[2] / "training" / "data" / "shards" / "1GJS_r0.npz"


@pytest.fixture(scope="module")
def md():
    sh = load_shard(SHARD)
    ca = torch.as_tensor(sh.coords_nm[:, :, 1], dtype=torch.float64)
    c = build_ca_constraints(sh.residue_index, sh.chain_index, sh.residue_mask, ca[0])
    return sh, ca, c


def _check_inside(x, c, tol):
    d = torch.linalg.vector_norm(x[..., c.pairs[:, 1], :] - x[..., c.pairs[:, 0], :], dim=-1)
    assert bool((d >= c.lo - tol).all() and (d <= c.hi + tol).all()), (d.min(), d.max())
    R = torch.cdist(x, x)
    assert bool((R >= c.min_nonbonded - tol).all())


def test_md_frames_pass_through_unchanged(md):
    """Every frame of a real MD trajectory is inside the bounds (they were read off such MD)."""
    sh, ca, c = md
    y, info = project_ca(ca, c)
    assert torch.equal(y, ca) and info["violation_before_nm"] == 0.0 and info["sweeps"] == 0
    assert c.pairs.shape == (sh.n_residues - 1, 2)  # one chain, no gaps: every consecutive pair held
    assert float(c.min_nonbonded.max()) == MIN_NONBONDED_CA_NM


def test_perturbed_frames_end_inside_every_bound(md):
    _, ca, c = md
    g = torch.Generator().manual_seed(0)
    noisy = ca[:4] + 0.05 * torch.randn(ca[:4].shape, generator=g, dtype=torch.float64)
    _, before = project_ca(noisy, c)
    assert before["violation_before_nm"] > 0.1  # the noise broke bounds by over 1 Å
    y, info = project_ca(noisy, c)
    assert info["violation_after_nm"] <= c.tol_nm and info["sweeps"] < c.max_sweeps
    _check_inside(y, c, c.tol_nm)
    assert info["max_move_nm"] < 0.15  # a local repair, not a new structure
    # the repair keeps the frame where it was: centroid moves far less than the residues
    assert float(torch.linalg.vector_norm(y.mean(-2) - noisy.mean(-2), dim=-1).max()) < 0.01


def test_projection_commutes_with_rigid_motions(md):
    _, ca, c = md
    g = torch.Generator().manual_seed(1)
    noisy = ca[0] + 0.05 * torch.randn(ca[0].shape, generator=g, dtype=torch.float64)
    R = so3.exp_map(torch.randn(3, generator=g, dtype=torch.float64))
    t = torch.randn(3, generator=g, dtype=torch.float64)
    a, _ = project_ca(noisy, c)
    b, _ = project_ca(noisy @ R.T + t, c)
    torch.testing.assert_close(b, a @ R.T + t, rtol=0, atol=1e-9)


def test_gaps_and_cis_peptides_of_the_start_are_respected(md):
    sh, ca, _ = md
    ref = ca[0].clone()
    res = np.array(sh.residue_index)
    res[20:] += 5  # a numbering gap after residue 19: no chain link held there
    d = ref[11] - ref[10]
    ref[11:] -= d * (1 - 0.29 / torch.linalg.vector_norm(d))  # 10-11 at 2.9 Å, as a cis peptide
    d = ref[30] - ref[29]
    ref[30:] += 0.3 * d / torch.linalg.vector_norm(d)  # 29-30 pulled 3 Å further apart: a gap in space
    c = build_ca_constraints(res, sh.chain_index, sh.residue_mask, ref)
    held = {tuple(p) for p in c.pairs.tolist()}
    assert (19, 20) not in held and (29, 30) not in held and (10, 11) in held
    k = c.pairs.tolist().index([10, 11])
    assert c.lo[k] == pytest.approx(0.29) and c.hi[k] == CHAIN_CA_RANGE_NM[1]
    # neighbours across the gap are no non-bonded pair either; the start itself is inside the bounds
    assert c.min_nonbonded[19, 20] == 0 and c.min_nonbonded[29, 30] == 0
    y, info = project_ca(ref, c)
    assert info["violation_before_nm"] <= 1e-12 and torch.equal(y, ref)


def test_extra_pairs_missing_residues_and_bad_input(md):
    sh, ca, _ = md
    mask = np.array(sh.residue_mask).copy()
    mask[5] = False
    d0 = float(torch.linalg.vector_norm(ca[0, 40] - ca[0, 2]))
    lo, hi = 0.85 * d0, 0.9 * d0  # the start sits outside: the projection must pull 2 and 40 together
    c = build_ca_constraints(sh.residue_index, sh.chain_index, mask, ca[0], [[2, 40]], lo, hi)
    held = c.pairs.tolist()
    assert [2, 40] in held and not any(5 in p for p in held) and float(c.min_nonbonded[5].abs().sum()) == 0
    y, info = project_ca(ca[0], c)
    assert info["violation_before_nm"] == pytest.approx(0.1 * d0)
    assert lo - 1e-4 <= float(torch.linalg.vector_norm(y[40] - y[2])) <= hi + 1e-4
    _check_inside(y, c, c.tol_nm)
    bad = ca[0].clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        build_ca_constraints(sh.residue_index, sh.chain_index, sh.residue_mask, bad)
    with pytest.raises(ValueError, match="two different residues"):
        build_ca_constraints(sh.residue_index, sh.chain_index, sh.residue_mask, ca[0], [[3, 3]], 0.4, 0.5)


def test_tracking_only_nearby_pairs_gives_the_dense_result(md):
    """Contacts squeezed below 3.5 Å and chain links stretched: the projection, which follows only
    the non-bonded pairs near their bound, ends where following all N² pairs every sweep ends."""
    _, ca, c = md
    g = torch.Generator().manual_seed(2)
    noisy = ca[:3] + 0.06 * torch.randn(ca[:3].shape, generator=g, dtype=torch.float64)
    y, info = project_ca(noisy, c)
    assert info["violation_before_nm"] > 0.1 and info["violation_after_nm"] <= c.tol_nm
    assert float((c.min_nonbonded - torch.cdist(noisy, noisy)).max()) > 0.02  # non-bonded bounds were violated
    dense, _ = project_ca(noisy, c, margin_nm=float("inf"))  # every non-bonded pair followed in every sweep
    torch.testing.assert_close(y, dense, rtol=0, atol=1e-10)


def test_no_link_is_held_across_chains(md):
    """Two chains (the protein cut in two): the pair at the cut is no chain link but a non-bonded
    pair, like any two residues of different chains."""
    sh, ca, _ = md
    chain = np.zeros(sh.n_residues, dtype=int)
    chain[20:] = 1
    c = build_ca_constraints(sh.residue_index, chain, sh.residue_mask, ca[0])
    held = {tuple(p) for p in c.pairs.tolist()}
    assert (19, 20) not in held and len(held) == sh.n_residues - 2
    assert float(c.min_nonbonded[19, 20]) == MIN_NONBONDED_CA_NM
