"""Backbone shards and trajectory readers (openmm_starmd/data.py).

Trajectories are made in the test from a real structure (1UBI) by small random displacements of
every atom, written with mdtraj in each format; the reader must return exactly the backbone
atoms of those frames (to the precision of the format).
"""
from __future__ import annotations

import json
import os

import mdtraj as md
import numpy as np
import pytest

from openmm_starmd.data import (BackboneShard, TrajectoryError, load_shard, read_atlas,
                                read_backbone_trajectory, save_shard, sha256_file)

# mdtraj falls back to scipy for NetCDF and says so.
pytestmark = pytest.mark.filterwarnings("ignore:.*netCDF4:UserWarning")

UBQ_SEQ = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"
FORMATS = {".dcd": 1e-4, ".xtc": 2e-3, ".trr": 1e-5, ".nc": 1e-5}


@pytest.fixture(scope="module")
def ubq(ubiquitin_pdb, tmp_path_factory):
    """1UBI protein atoms + a 6-frame jittered trajectory (times 10, 20, ... ps) in several formats."""
    d = tmp_path_factory.mktemp("traj")
    ref = md.load(str(ubiquitin_pdb))
    ref = ref.atom_slice(ref.topology.select("protein"))
    top = str(d / "ubq.pdb")
    ref.save_pdb(top)
    rng = np.random.default_rng(0)
    xyz = ref.xyz[0][None] + rng.normal(scale=0.01, size=(6,) + ref.xyz.shape[1:]).astype(np.float32)
    traj = md.Trajectory(xyz, ref.topology, time=10.0 * np.arange(1, 7))
    paths = {}
    for ext in FORMATS:
        paths[ext] = str(d / f"ubq{ext}")
        traj.save(paths[ext])
    return dict(dir=d, top=top, traj=traj, paths=paths)


def _backbone(traj):
    idx = [[next(a.index for a in r.atoms if a.name == n) for n in ("N", "CA", "C", "O")]
           for r in traj.topology.residues]
    return traj.xyz[:, np.array(idx)]


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_reader_returns_backbone_of_every_format(ubq, ext):
    shard = read_backbone_trajectory(ubq["paths"][ext], ubq["top"], frame_spacing_ns=0.01)
    assert shard.coords_nm.shape == (6, 76, 4, 3) and shard.coords_nm.dtype == np.float32
    np.testing.assert_allclose(shard.coords_nm, _backbone(ubq["traj"]), atol=FORMATS[ext])
    assert shard.sequence == UBQ_SEQ
    assert shard.residue_mask.all()
    assert shard.residue_index[0] == 1 and shard.residue_index[-1] == 76
    assert shard.chain_ids == ["A"] and (shard.chain_index == 0).all()
    np.testing.assert_allclose(shard.time_ns, 0.01 * np.arange(1, 7))


def test_hdf5_with_embedded_topology_or_clear_error(ubq):
    """mdtraj's HDF5 needs the optional PyTables: read it when present, say so when not."""
    import importlib.util

    path = str(ubq["dir"] / "ubq.h5")
    if importlib.util.find_spec("tables") is None:
        with open(path, "wb") as fh:
            fh.write(b"\x89HDF\r\n\x1a\n")  # an HDF5 signature is enough to reach the check
        with pytest.raises(TrajectoryError, match=r"ubq.h5: reading HDF5 needs PyTables; `pip install tables`"):
            read_backbone_trajectory(path)
        return
    ubq["traj"].save(path)
    shard = read_backbone_trajectory(path)
    np.testing.assert_allclose(shard.coords_nm, _backbone(ubq["traj"]), atol=1e-5)


def test_times_from_timed_formats_and_required_for_dcd(ubq):
    shard = read_backbone_trajectory(ubq["paths"][".xtc"], ubq["top"])
    assert shard.frame_spacing_ns == pytest.approx(0.01)
    np.testing.assert_allclose(shard.time_ns, 0.01 * np.arange(1, 7), atol=1e-9)
    with pytest.raises(TrajectoryError, match="no frame times; pass frame_spacing_ns"):
        read_backbone_trajectory(ubq["paths"][".dcd"], ubq["top"])


def test_n_frames_and_stride(ubq):
    shard = read_backbone_trajectory(ubq["paths"][".dcd"], ubq["top"], frame_spacing_ns=0.01, n_frames=4)
    assert shard.n_frames == 4
    np.testing.assert_allclose(shard.coords_nm, _backbone(ubq["traj"])[:4], atol=1e-4)
    strided = read_backbone_trajectory(ubq["paths"][".dcd"], ubq["top"], frame_spacing_ns=0.01, stride=2)
    assert strided.n_frames == 3 and strided.frame_spacing_ns == pytest.approx(0.02)
    np.testing.assert_allclose(strided.coords_nm, _backbone(ubq["traj"])[::2], atol=1e-4)
    with pytest.raises(TrajectoryError, match="fewer than the 9 requested"):
        read_backbone_trajectory(ubq["paths"][".dcd"], ubq["top"], frame_spacing_ns=0.01, n_frames=9)


def test_missing_backbone_atom_is_masked(missing_backbone_pdb, tmp_path):
    t = md.load(str(missing_backbone_pdb))
    path = str(tmp_path / "m.dcd")
    t.save(path)
    shard = read_backbone_trajectory(path, str(missing_backbone_pdb), frame_spacing_ns=0.01)
    assert shard.n_residues == 76
    assert np.flatnonzero(~shard.residue_mask).tolist() == [29, 44]  # ILE 30 (CA), PHE 45 (O)
    assert (shard.coords_nm[:, 29, 1] == 0).all()


def test_two_chains(two_chain_pdb, tmp_path):
    t = md.load(str(two_chain_pdb))
    path = str(tmp_path / "two.xtc")
    t.save(path)
    shard = read_backbone_trajectory(path, str(two_chain_pdb), frame_spacing_ns=0.01)
    assert shard.chain_ids == ["A", "B"]
    assert np.bincount(shard.chain_index).tolist() == [76, 48]


def test_shard_round_trip_without_pickle(ubq, tmp_path):
    shard = read_backbone_trajectory(ubq["paths"][".dcd"], ubq["top"], frame_spacing_ns=0.01, name="ubq",
                                     replica=1, forcefield="test", provenance={"seed": 3})
    path = str(tmp_path / "ubq_r1.npz")
    sha = save_shard(path, shard)
    assert sha == sha256_file(path)
    with np.load(path, allow_pickle=False) as z:
        assert z["coords_nm"].shape == (6, 76, 4, 3)
        assert str(z["sequence"]) == UBQ_SEQ
        assert json.loads(str(z["provenance"]))["seed"] == 3
    back = load_shard(path, sha256=sha)
    np.testing.assert_array_equal(back.coords_nm, shard.coords_nm)
    np.testing.assert_array_equal(back.aatype, shard.aatype)
    assert (back.name, back.replica, back.forcefield) == ("ubq", 1, "test")
    assert back.aatype[0] == "ARNDCQEGHILKMFPSTWYV".index("M")
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_sha_mismatch_refused(ubq, tmp_path):
    shard = read_backbone_trajectory(ubq["paths"][".dcd"], ubq["top"], frame_spacing_ns=0.01)
    path = str(tmp_path / "s.npz")
    save_shard(path, shard)
    with pytest.raises(TrajectoryError, match="differs from the manifest"):
        load_shard(path, sha256="0" * 64)


def test_atlas_layout(ubq, tmp_path):
    """ATLAS: <name>.pdb + <name>_prod_R{k}_fit.xtc, frames every 10 ps."""
    t = ubq["traj"]
    t.save_pdb(str(tmp_path / "1ubq_A.pdb"))
    for k in (1, 2):
        t.save(str(tmp_path / f"1ubq_A_prod_R{k}_fit.xtc"))
    shards = read_atlas(str(tmp_path), "1ubq_A", replicas=(1, 2))
    assert [s.replica for s in shards] == [0, 1]
    assert all(s.frame_spacing_ns == pytest.approx(0.01) and s.n_frames == 6 for s in shards)
    assert shards[0].sequence == UBQ_SEQ
    with pytest.raises(TrajectoryError, match="R3 not found"):
        read_atlas(str(tmp_path), "1ubq_A")


# ---- bad input ------------------------------------------------------------------------------

def test_empty_and_unreadable_and_missing(ubq, tmp_path):
    empty = tmp_path / "empty.dcd"
    empty.write_bytes(b"")
    with pytest.raises(TrajectoryError, match="empty.dcd: file is empty"):
        read_backbone_trajectory(str(empty), ubq["top"], frame_spacing_ns=0.01)
    junk = tmp_path / "junk.xtc"
    junk.write_bytes(os.urandom(4000))
    with pytest.raises(TrajectoryError, match="junk.xtc: unreadable trajectory"):
        read_backbone_trajectory(str(junk), ubq["top"], frame_spacing_ns=0.01)
    with pytest.raises(TrajectoryError, match="file not found"):
        read_backbone_trajectory(str(tmp_path / "none.dcd"), ubq["top"], frame_spacing_ns=0.01)


def test_atom_count_mismatch(ubq, crambin_pdb):
    with pytest.raises(TrajectoryError, match=r"ubq.dcd: has 602 atoms per frame but topology .* has \d+"):
        read_backbone_trajectory(ubq["paths"][".dcd"], str(crambin_pdb), frame_spacing_ns=0.01)


def test_no_protein_residues(ubiquitin_pdb, tmp_path):
    t = md.load(str(ubiquitin_pdb))
    w = t.atom_slice(t.topology.select("water"))
    w.save_pdb(str(tmp_path / "w.pdb"))
    w.save(str(tmp_path / "w.dcd"))
    with pytest.raises(TrajectoryError, match="no protein residues"):
        read_backbone_trajectory(str(tmp_path / "w.dcd"), str(tmp_path / "w.pdb"), frame_spacing_ns=0.01)


def test_nan_coordinates_refused_and_never_saved(ubq, tmp_path):
    t = ubq["traj"]
    xyz = t.xyz.copy()
    xyz[3, 1] = np.nan  # CA of Met 1
    path = str(tmp_path / "nan.trr")
    md.Trajectory(xyz, t.topology, time=t.time).save(path)
    with pytest.raises(TrajectoryError, match=r"NaN/inf coordinates in frames \[3\]"):
        read_backbone_trajectory(path, ubq["top"], frame_spacing_ns=0.01)
    good = read_backbone_trajectory(ubq["paths"][".dcd"], ubq["top"], frame_spacing_ns=0.01)
    good.coords_nm[2, 0, 0, 0] = np.nan
    with pytest.raises(TrajectoryError, match="NaN"):
        save_shard(str(tmp_path / "bad.npz"), good)
    assert os.listdir(tmp_path) == ["nan.trr"]


def test_shard_shape_checks():
    with pytest.raises(TrajectoryError, match="sequence has 3 letters for 2 residues"):
        BackboneShard(np.zeros((1, 2, 4, 3)), 0.01, "AAA", [1, 2], [0, 0], ["A"], [True, True])
    with pytest.raises(TrajectoryError, match="has no frames"):
        BackboneShard(np.zeros((0, 2, 4, 3)), 0.01, "AA", [1, 2], [0, 0], ["A"], [True, True])
