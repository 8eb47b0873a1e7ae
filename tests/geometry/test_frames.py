"""Residue frames <-> backbone atoms, checked on real structures read by mdtraj.

Measured on the shipped files (ideal minus real, RMSD over residues, Å):

=================  =====  =====  =====  ===========================
structure          N      C      O      O from next frame (interior)
=================  =====  =====  =====  ===========================
1UBI (1.8 Å xtal)  0.053  0.013  0.021  0.057
1EJG (0.54 Å)      0.065  0.011  0.037  0.084
1ENH (MD-relaxed)  0.106  0.039  0.080  0.172
=================  =====  =====  =====  ===========================

CA is exact by construction. The bounds below sit a little above these numbers.
"""
import math

import mdtraj as md
import numpy as np
import pytest
import torch

from openmm_starmd.geometry.frames import (
    DEFAULT_TERMINAL_PSI,
    IDEAL_C_NM,
    IDEAL_N_NM,
    backbone_from_frames,
    dihedral,
    frames_from_backbone,
    ideal_n_ca_c,
    idealize_backbone,
    oxygen_from_next_frame,
    oxygen_from_psi,
    psi_from_backbone,
)
from openmm_starmd.geometry.rigid import Rigid, invert_apply
from openmm_starmd.geometry.so3 import random_rotations

# name -> (fixture, bounds on the ideal-vs-real RMSD of N, C, O and next-frame O, in Å)
STRUCTURES = {
    "ubiquitin": ("ubiquitin_pdb", (0.08, 0.02, 0.04, 0.08)),
    "crambin": ("crambin_pdb", (0.08, 0.02, 0.05, 0.11)),
    "engrailed": ("engrailed_pdb", (0.13, 0.05, 0.10, 0.22)),
}


def _load(path):
    traj = md.load(str(path))
    residues = [r for r in traj.topology.residues if r.is_protein]
    idx = [[r.atom(name).index for name in ("N", "CA", "C", "O")] for r in residues]
    return traj, torch.tensor(traj.xyz[0][np.array(idx)], dtype=torch.float64)


@pytest.fixture(scope="module", params=list(STRUCTURES))
def structure(request):
    fixture, bounds = STRUCTURES[request.param]
    traj, backbone = _load(request.getfixturevalue(fixture))
    return request.param, traj, backbone, bounds


def _frames(backbone):
    n, ca, c, _ = backbone.unbind(-2)
    return frames_from_backbone(n, ca, c)


def _random_rigid(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return Rigid(random_rotations(shape, generator=g, dtype=dtype), torch.randn(*shape, 3, generator=g, dtype=dtype))


def test_frames_are_proper_rotations_at_ca(structure):
    _, _, backbone, _ = structure
    frames = _frames(backbone)
    eye = torch.eye(3, dtype=frames.rots.dtype)
    torch.testing.assert_close(frames.rots.transpose(-1, -2) @ frames.rots, eye.expand_as(frames.rots))
    torch.testing.assert_close(torch.linalg.det(frames.rots), torch.ones(len(backbone), dtype=torch.float64))
    torch.testing.assert_close(frames.trans, backbone[:, 1])


def test_frame_axes_follow_the_convention(structure):
    """Locally C lies on +x and N in the xy-plane with y > 0."""
    _, _, backbone, _ = structure
    local = invert_apply(_frames(backbone), backbone)
    c_local, n_local = local[:, 2], local[:, 0]
    torch.testing.assert_close(c_local[:, 1:], torch.zeros_like(c_local[:, 1:]), atol=1e-10, rtol=0)
    assert (c_local[:, 0] > 0).all()
    torch.testing.assert_close(n_local[:, 2], torch.zeros_like(n_local[:, 2]), atol=1e-10, rtol=0)
    assert (n_local[:, 1] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frames_to_ideal_atoms_to_frames_round_trips(structure, dtype):
    _, _, backbone, _ = structure
    frames = _frames(backbone.to(dtype))
    n, ca, c = ideal_n_ca_c(frames).unbind(-2)
    again = frames_from_backbone(n, ca, c)
    torch.testing.assert_close(again.rots, frames.rots, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.trans, frames.trans, atol=1e-5, rtol=0)


def test_random_frames_round_trip_through_full_backbone():
    frames = _random_rigid((3, 50), seed=0)
    atoms = backbone_from_frames(frames)
    again = frames_from_backbone(atoms[..., 0, :], atoms[..., 1, :], atoms[..., 2, :])
    torch.testing.assert_close(again.rots, frames.rots, atol=1e-10, rtol=0)
    torch.testing.assert_close(again.trans, frames.trans, atol=1e-10, rtol=0)


def _angle(a, b, c):
    u, v = a - b, c - b
    return torch.rad2deg(torch.acos((u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))))


def test_ideal_geometry_is_engh_huber():
    frames = _random_rigid((40,), seed=1)
    psi = torch.linspace(-math.pi, math.pi, 40, dtype=torch.float64)
    n, ca, c, o = backbone_from_frames(frames, psi).unbind(-2)

    def full(value):
        return torch.full((40,), value, dtype=torch.float64)

    torch.testing.assert_close((n - ca).norm(dim=-1), full(0.14606), atol=1e-5, rtol=0)
    torch.testing.assert_close((c - ca).norm(dim=-1), full(0.1526), atol=1e-9, rtol=0)
    torch.testing.assert_close((o - c).norm(dim=-1), full(0.12333), atol=1e-5, rtol=0)
    torch.testing.assert_close(_angle(n, ca, c), full(111.06), atol=0.01, rtol=0)
    torch.testing.assert_close(_angle(ca, c, o), full(120.56), atol=0.01, rtol=0)


def test_real_backbone_to_ideal_backbone_stays_close(structure):
    name, _, backbone, (n_max, c_max, o_max, _) = structure
    rmsd_A = idealize_backbone(backbone).rmsd * 10
    assert rmsd_A[1] < 1e-6, name
    assert rmsd_A[0] < n_max and rmsd_A[2] < c_max and rmsd_A[3] < o_max, (name, rmsd_A)


def test_idealized_frames_rebuild_the_same_ideal_backbone(structure):
    _, _, backbone, _ = structure
    first = idealize_backbone(backbone)
    second = idealize_backbone(first.backbone)
    torch.testing.assert_close(second.backbone, first.backbone, atol=1e-10, rtol=0)
    assert second.rmsd.max() < 1e-9


def test_frames_and_atoms_are_se3_equivariant(structure):
    _, _, backbone, _ = structure
    g = _random_rigid((), seed=2)
    moved = backbone @ g.rots.T + g.trans
    frames, frames_moved = _frames(backbone), _frames(moved)
    torch.testing.assert_close(frames_moved.rots, g.rots @ frames.rots)
    torch.testing.assert_close(frames_moved.trans, frames.trans @ g.rots.T + g.trans)
    torch.testing.assert_close(backbone_from_frames(frames_moved), backbone_from_frames(frames) @ g.rots.T + g.trans)
    torch.testing.assert_close(psi_from_backbone(moved), psi_from_backbone(backbone))


def test_dihedral_matches_mdtraj_psi(structure):
    """psi from N(i+1) through our dihedral equals mdtraj's psi exactly: same sign convention."""
    _, traj, backbone, _ = structure
    _, psi_md = md.compute_psi(traj)
    n, ca, c, _ = backbone.unbind(-2)
    ours = dihedral(n[:-1], ca[:-1], c[:-1], n[1:])
    torch.testing.assert_close(ours, torch.tensor(psi_md[0], dtype=torch.float64), atol=1e-4, rtol=0)


def test_psi_through_o_tracks_psi_through_next_n(structure):
    name, traj, backbone, _ = structure
    _, psi_md = md.compute_psi(traj)
    diff = torch.rad2deg(psi_from_backbone(backbone)[:-1] - torch.tensor(psi_md[0], dtype=torch.float64))
    diff = (diff + 180) % 360 - 180
    # The O sits a few degrees out of the peptide plane; MD-relaxed structures a bit more.
    assert diff.abs().mean() < 6 and diff.abs().max() < 20, (name, diff.abs().mean(), diff.abs().max())


def test_oxygen_from_psi_sits_trans_to_next_n():
    frames = _random_rigid((64,), seed=3)
    psi = torch.empty(64, dtype=torch.float64).uniform_(-math.pi, math.pi, generator=torch.Generator().manual_seed(4))
    n, ca, c = ideal_n_ca_c(frames).unbind(-2)
    o = oxygen_from_psi(frames, psi)
    torsion = dihedral(n, ca, c, o)
    diff = torch.atan2(torch.sin(torsion - psi - math.pi), torch.cos(torsion - psi - math.pi))
    torch.testing.assert_close(diff, torch.zeros_like(diff), atol=1e-9, rtol=0)


def test_oxygen_from_real_psi_is_close_to_real_oxygen(structure):
    name, _, backbone, (_, _, o_max, _) = structure
    frames = _frames(backbone)
    o = oxygen_from_psi(frames, psi_from_backbone(backbone))
    rmsd_A = 10 * (o - backbone[:, 3]).norm(dim=-1).pow(2).mean().sqrt()
    assert rmsd_A < o_max, (name, rmsd_A)


def test_oxygen_from_next_frame_lies_in_the_peptide_plane(structure):
    name, _, backbone, (_, _, _, next_max) = structure
    frames = _frames(backbone)
    head = Rigid(frames.rots[:-1], frames.trans[:-1])
    tail = Rigid(frames.rots[1:], frames.trans[1:])
    o = oxygen_from_next_frame(head, tail)
    n, ca, c = ideal_n_ca_c(head).unbind(-2)
    next_n = ideal_n_ca_c(tail)[:, 0]
    gap = dihedral(n, ca, c, o) - dihedral(n, ca, c, next_n)
    torch.testing.assert_close(torch.cos(gap), -torch.ones_like(gap), atol=1e-9, rtol=0)
    rmsd_A = 10 * (o - backbone[:-1, 3]).norm(dim=-1).pow(2).mean().sqrt()
    assert rmsd_A < next_max, (name, rmsd_A)
    # backbone_from_frames without psi does the same for every residue but the last one.
    torch.testing.assert_close(backbone_from_frames(frames)[:-1, 3], o)


def test_chain_ends_and_breaks_fall_back_to_terminal_psi(ubiquitin_pdb, crambin_pdb):
    _, ubq = _load(ubiquitin_pdb)
    _, crn = _load(crambin_pdb)
    frames = _frames(torch.cat([ubq, crn]))
    terminal_o = oxygen_from_psi(frames, torch.full((len(frames.trans),), DEFAULT_TERMINAL_PSI, dtype=torch.float64))
    chain_index = torch.tensor([0] * len(ubq) + [1] * len(crn))
    last = [len(ubq) - 1, len(ubq) + len(crn) - 1]
    # The two proteins sit far apart, so the distance test alone already sees the break ...
    interior = slice(0, len(ubq) - 1)
    next_o = oxygen_from_next_frame(
        Rigid(frames.rots[interior], frames.trans[interior]),
        Rigid(frames.rots[1 : len(ubq)], frames.trans[1 : len(ubq)]),
    )
    for chains in (None, chain_index):
        o = backbone_from_frames(frames, chain_index=chains)[:, 3]
        torch.testing.assert_close(o[last], terminal_o[last])
        torch.testing.assert_close(o[interior], next_o)
    # ... and chain_index alone stops at a chain end even when the next N is bonded.
    chains = torch.zeros(len(ubq), dtype=torch.long)
    chains[40:] = 1
    o = backbone_from_frames(_frames(ubq), chain_index=chains)[:, 3]
    fallback = oxygen_from_psi(_frames(ubq), torch.full((len(ubq),), DEFAULT_TERMINAL_PSI, dtype=torch.float64))
    torch.testing.assert_close(o[39], fallback[39])


def test_batched_frames_match_unbatched(structure):
    _, _, backbone, _ = structure
    g = _random_rigid((2, 3), seed=5)
    batch = torch.einsum("btij,npj->btnpi", g.rots, backbone) + g.trans[:, :, None, None, :]
    frames = _frames(batch)
    atoms = backbone_from_frames(frames)
    assert atoms.shape == (2, 3, len(backbone), 4, 3)
    single = backbone_from_frames(Rigid(frames.rots[1, 2], frames.trans[1, 2]))
    torch.testing.assert_close(atoms[1, 2], single)
    assert idealize_backbone(batch).rmsd.shape == (2, 3, 4)


def test_masked_residues_get_identity_frames_without_nan(ubiquitin_pdb):
    _, backbone = _load(ubiquitin_pdb)
    backbone = backbone.clone()
    mask = torch.ones(len(backbone), dtype=torch.bool)
    mask[[0, 30]] = False
    backbone[[0, 30]] = 0.0
    frames = frames_from_backbone(*backbone.unbind(-2)[:3], mask=mask)
    torch.testing.assert_close(frames.rots[[0, 30]], torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    assert torch.isfinite(frames.rots).all()
    result = idealize_backbone(backbone, mask)
    clean = idealize_backbone(backbone[mask])
    torch.testing.assert_close(result.rmsd, clean.rmsd)


def test_ideal_constants_are_alphafold_alanine_in_nm():
    # rigid_group_atom_positions['ALA'] in Å: N (-0.525, 1.363, 0), C (1.526, 0, 0).
    assert IDEAL_N_NM == (-0.0525, 0.1363, 0.0)
    assert IDEAL_C_NM == (0.1526, 0.0, 0.0)
