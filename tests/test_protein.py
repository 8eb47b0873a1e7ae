"""Protein extraction from real PDB/mmCIF files and OpenMM Topologies, and its errors."""
import gzip
import shutil

import mdtraj as md
import numpy as np
import openmm.unit as unit
import pytest
import torch
from openmm.app import Modeller, PDBFile

from openmm_starmd.geometry.frames import frames_from_backbone, idealize_backbone
from openmm_starmd.protein import (
    RESTYPES,
    UNKNOWN_AATYPE,
    ProteinInputError,
    extract_protein,
    load_protein,
    read_structure,
)

UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"
CRAMBIN = "TTCCPSIVARSNFNVCRLPGTPEALCATYTGCIIIPGATCPGDYAN"  # SEQRES of 1EJG, first altloc of 22/25
ENGRAILED = "AFSSEQLARLKREFNENRYLTERRRQQLSSELGLNEAQIKIWFQNKRA"


def _kinds(protein):
    out = {}
    for s in protein.skipped:
        out[(s.kind, s.name)] = out.get((s.kind, s.name), 0) + 1
    return out


def _check_atom_bookkeeping(protein, topology):
    """Every atom belongs to exactly one protein or skipped residue, and backbone indices fit."""
    all_indices = np.concatenate(list(protein.atom_indices) + [s.atom_indices for s in protein.skipped])
    assert np.array_equal(np.sort(all_indices), np.arange(topology.getNumAtoms()))
    residues = list(topology.residues())
    for i, indices in enumerate(protein.atom_indices):
        residue = residues[protein.topology_residue_index[i]]
        assert residue.name == protein.residue_names[i]
        assert sorted(a.index for a in residue.atoms()) == sorted(indices.tolist())


def test_ubiquitin_extraction(ubiquitin_pdb):
    pdb = PDBFile(str(ubiquitin_pdb))
    protein = extract_protein(pdb.topology, pdb.positions)
    assert protein.sequence == UBIQUITIN and len(protein) == protein.n_residues == 76
    assert protein.chain_ids == ("A",)  # the waters' chain holds no protein and is not counted
    assert np.array_equal(protein.aatype, [RESTYPES.index(s) for s in UBIQUITIN])
    assert protein.aatype.dtype == np.int64 and protein.backbone_nm.dtype == np.float32
    assert protein.mask.all() and protein.atom_mask.all()
    assert np.array_equal(protein.residue_index, np.arange(76))
    assert protein.author_residue_ids == tuple(str(i) for i in range(1, 77))
    assert np.array_equal(protein.chain_index, np.zeros(76))
    assert _kinds(protein) == {("water", "HOH"): 81}
    _check_atom_bookkeeping(protein, pdb.topology)


def test_backbone_matches_an_independent_reader(ubiquitin_pdb):
    protein = load_protein(ubiquitin_pdb)
    traj = md.load(str(ubiquitin_pdb))
    residues = [r for r in traj.topology.residues if r.is_protein]
    expected = np.array([[traj.xyz[0, r.atom(n).index] for n in ("N", "CA", "C", "O")] for r in residues])
    np.testing.assert_allclose(protein.backbone_nm, expected, atol=1e-6)


def test_crambin_with_hydrogens_and_alternate_locations(crambin_pdb):
    protein = load_protein(crambin_pdb)
    assert protein.sequence == CRAMBIN and protein.mask.all()
    assert protein.skipped == ()
    topology, _ = read_structure(crambin_pdb)
    _check_atom_bookkeeping(protein, topology)
    first = [a.name for a in list(topology.residues())[0].atoms()]
    assert {"H", "H2", "H3", "HA"} <= set(first)  # hydrogens map to their residue too


def test_engrailed_keeps_oxt_with_its_residue(engrailed_pdb):
    protein = load_protein(engrailed_pdb)
    assert protein.sequence == ENGRAILED
    topology, positions = read_structure(engrailed_pdb)
    last = list(topology.residues())[-1]
    names = {a.index: a.name for a in last.atoms()}
    assert "OXT" in {names[i] for i in protein.atom_indices[-1]}
    o_index = next(i for i, n in names.items() if n == "O")
    np.testing.assert_allclose(protein.backbone_nm[-1, 3], positions[o_index].value_in_unit(unit.nanometer), atol=1e-6)


def test_protein_dna_cofactor_complex(protein_dna_ligand_pdb):
    protein = load_protein(protein_dna_ligand_pdb)
    assert len(protein) == 327 and protein.sequence.startswith("MIEIKDKQLTG")
    assert protein.chain_ids == ("A",)
    kinds = _kinds(protein)
    assert kinds[("ligand", "SAH")] == 1  # has N, CA, C but is not peptide-bonded
    assert kinds[("water", "HOH")] == 70
    assert sum(v for (k, _), v in kinds.items() if k == "nucleic") == 25


def test_two_chains(two_chain_pdb):
    protein = load_protein(two_chain_pdb)
    assert protein.chain_ids == ("A", "B")
    assert protein.chain_sequences == (UBIQUITIN, ENGRAILED)
    assert protein.sequence == UBIQUITIN + ENGRAILED
    assert np.array_equal(protein.chain_index, [0] * 76 + [1] * 48)
    assert np.array_equal(protein.residue_index, list(range(76)) + list(range(48)))


def test_ions_water_and_ligand_are_skipped_and_recorded(hetero_pdb):
    protein = load_protein(hetero_pdb)
    assert protein.sequence == UBIQUITIN
    assert _kinds(protein) == {("water", "HOH"): 79, ("ion", "NA"): 1, ("ion", "CL"): 1, ("ligand", "SAH"): 1}
    topology, _ = read_structure(hetero_pdb)
    _check_atom_bookkeeping(protein, topology)
    sah = next(s for s in protein.skipped if s.name == "SAH")
    assert sah.residue_id == "200" and sah.chain_id == "A" and len(sah.atom_indices) == 26


def test_caps_are_skipped_not_errors(capped_pdb):
    protein = load_protein(capped_pdb)
    assert protein.sequence == UBIQUITIN[1:-1]
    assert protein.author_residue_ids[0] == "2"
    caps = [s for s in protein.skipped if s.kind == "cap"]
    assert [c.name for c in caps] == ["ACE", "NME"]
    assert [len(c.atom_indices) for c in caps] == [3, 2]


def test_nonstandard_residue_is_named_in_the_error(nonstandard_pdb):
    with pytest.raises(ProteinInputError, match=r"MSE 1 \(chain A\).*residue_map"):
        load_protein(nonstandard_pdb)


def test_residue_map_resolves_nonstandard_residues(nonstandard_pdb):
    protein = load_protein(nonstandard_pdb, residue_map={"MSE": "MET"})
    assert protein.sequence == UBIQUITIN and protein.residue_names[0] == "MSE"
    unknown = load_protein(nonstandard_pdb, residue_map={"mse": "unk"})
    assert unknown.sequence == "X" + UBIQUITIN[1:] and unknown.aatype[0] == UNKNOWN_AATYPE
    with pytest.raises(ProteinInputError, match=r"residue_map\['MSE'\] = 'SEL'"):
        load_protein(nonstandard_pdb, residue_map={"MSE": "SEL"})


def test_force_field_aliases_map_to_standard_residues(ubiquitin_pdb, crambin_pdb):
    pdb = PDBFile(str(ubiquitin_pdb))
    residues = list(pdb.topology.residues())
    # Names as a Topology from Amber/CHARMM/GROMACS files carries them.
    for index, alias in [(0, "NMET"), (5, "LYN"), (20, "ASH"), (23, "GLH"), (67, "HIE"), (71, "ARN"), (75, "CGLY")]:
        residues[index].name = alias
    protein = extract_protein(pdb.topology, pdb.positions)
    assert protein.sequence == UBIQUITIN
    assert protein.residue_names[67] == "HIE"

    crn = PDBFile(str(crambin_pdb))
    cysteines = [r for r in crn.topology.residues() if r.name == "CYS"]
    for residue, alias in zip(cysteines, ["CYX", "CYM", "CYS2", "CYX", "CYX", "CYX"]):
        residue.name = alias
    his = [r for r in crn.topology.residues() if r.name == "TYR"][0]
    his.name = "HSD"  # crambin has no HIS: a renamed TYR still reads as H
    assert extract_protein(crn.topology, crn.positions).sequence == CRAMBIN.replace("Y", "H", 1)


def test_unk_residue_is_unknown_type(ubiquitin_pdb):
    pdb = PDBFile(str(ubiquitin_pdb))
    list(pdb.topology.residues())[9].name = "UNK"
    protein = extract_protein(pdb.topology, pdb.positions)
    assert protein.sequence[9] == "X" and protein.aatype[9] == UNKNOWN_AATYPE == 20


def test_missing_backbone_atoms_are_an_error(missing_backbone_pdb):
    expected = r"ILE 30 \(chain A\) lacks CA.*PHE 45 \(chain A\) lacks O.*prepare_protein.*allow_missing=True"
    with pytest.raises(ProteinInputError, match=expected):
        load_protein(missing_backbone_pdb)


def test_allow_missing_masks_residues(missing_backbone_pdb):
    protein = load_protein(missing_backbone_pdb, allow_missing=True)
    assert protein.sequence == UBIQUITIN
    assert np.flatnonzero(~protein.mask).tolist() == [29]  # no CA: no frame
    assert protein.mask[44] and not protein.atom_mask[44, 3]  # no O: frame still defined
    assert np.flatnonzero(~protein.atom_mask.ravel()).tolist() == [29 * 4 + 1, 44 * 4 + 3]
    assert not protein.backbone_nm[29, 1].any() and not protein.backbone_nm[44, 3].any()
    frames = protein.frames()
    assert torch.isfinite(frames.rots).all()
    torch.testing.assert_close(frames.rots[29], torch.eye(3))


@pytest.mark.filterwarnings("ignore:Unlikely unit cell vectors")  # mdtraj on the NMR CRYST1
def test_multiple_models_need_a_choice(nmr_models_pdb):
    with pytest.raises(ProteinInputError, match=r"3 models.*model=0 \.\. model=2"):
        load_protein(nmr_models_pdb)
    with pytest.raises(ProteinInputError, match=r"model=3 is out of range"):
        load_protein(nmr_models_pdb, model=3)
    traj = md.load(str(nmr_models_pdb))
    ca = [a.index for a in traj.topology.atoms if a.name == "CA"]
    for model in (0, 2):
        protein = load_protein(nmr_models_pdb, model=model)
        assert protein.sequence == UBIQUITIN[:10]
        np.testing.assert_allclose(protein.backbone_nm[:, 1], traj.xyz[model, ca], atol=1e-6)


def test_no_protein_is_an_error(ubiquitin_pdb):
    pdb = PDBFile(str(ubiquitin_pdb))
    modeller = Modeller(pdb.topology, pdb.positions)
    modeller.delete([r for r in modeller.topology.residues() if r.name != "HOH"])
    with pytest.raises(ProteinInputError, match=r"no protein residues \(found only: water\)"):
        extract_protein(modeller.topology, modeller.positions)


def test_mmcif_and_gzip_read_like_pdb(ubiquitin_pdb, ubiquitin_cif, tmp_path):
    reference = load_protein(ubiquitin_pdb)
    gz = tmp_path / "ubiquitin.pdb.gz"
    with open(ubiquitin_pdb, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    for path in (ubiquitin_cif, gz):
        other = load_protein(path)
        assert other.sequence == reference.sequence
        np.testing.assert_allclose(other.backbone_nm, reference.backbone_nm, atol=1e-6)
        assert _kinds(other) == _kinds(reference)


def test_bad_paths_and_positions(ubiquitin_pdb, tmp_path):
    with pytest.raises(ProteinInputError, match="does not exist"):
        load_protein(tmp_path / "absent.pdb")
    odd = tmp_path / "ubiquitin.xyz"
    shutil.copy(ubiquitin_pdb, odd)
    with pytest.raises(ProteinInputError, match="unknown extension"):
        load_protein(odd)
    pdb = PDBFile(str(ubiquitin_pdb))
    bare = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    with pytest.raises(ProteinInputError, match="openmm.unit Quantity"):
        extract_protein(pdb.topology, bare)
    with pytest.raises(ProteinInputError, match="not a length"):
        extract_protein(pdb.topology, unit.Quantity(bare, unit.kelvin))
    with pytest.raises(ProteinInputError, match=r"has 683 atoms"):
        extract_protein(pdb.topology, unit.Quantity(bare[:-1], unit.nanometer))


def test_angstrom_positions_are_converted(ubiquitin_pdb):
    pdb = PDBFile(str(ubiquitin_pdb))
    angstrom = pdb.getPositions(asNumpy=True).in_units_of(unit.angstrom)
    a = extract_protein(pdb.topology, angstrom)
    b = extract_protein(pdb.topology, pdb.positions)
    np.testing.assert_allclose(a.backbone_nm, b.backbone_nm, atol=1e-6)


def test_frames_from_protein_backbone(two_chain_pdb):
    protein = load_protein(two_chain_pdb)
    frames = protein.frames()
    bb = torch.as_tensor(protein.backbone_nm)
    direct = frames_from_backbone(bb[:, 0], bb[:, 1], bb[:, 2])
    torch.testing.assert_close(frames.rots, direct.rots)
    torch.testing.assert_close(frames.trans, bb[:, 1])
    rmsd_A = idealize_backbone(bb.double(), torch.as_tensor(protein.mask)).rmsd * 10
    assert rmsd_A[0] < 0.13 and rmsd_A[2] < 0.05 and rmsd_A[3] < 0.1


def test_disulfide_pairs_of_crambin(crambin_pdb):
    """C3-C40, C4-C32, C16-C26 (0-based residue indices of the protein), from the Topology's SG-SG bonds."""
    from openmm_starmd import prepare_protein
    from openmm_starmd.protein import DISULFIDE_CA_RANGE_NM, disulfide_bounds, disulfide_pairs, extract_protein

    prepared = prepare_protein(crambin_pdb)
    protein = extract_protein(prepared.topology, prepared.positions)
    pairs = disulfide_pairs(prepared.topology, protein.topology_residue_index)
    assert pairs.tolist() == [[2, 39], [3, 31], [15, 25]]
    assert [protein.residue_names[i] for i in pairs.reshape(-1)] == ["CYS"] * 6
    bounds = disulfide_bounds(prepared.topology, protein.topology_residue_index)
    assert bounds[1:] == DISULFIDE_CA_RANGE_NM
    # the crystal structure's own Cα-Cα distances lie inside the range
    import numpy as np
    from openmm import unit

    x = np.asarray(prepared.positions.value_in_unit(unit.nanometer))
    ca = [next(a.index for a in r.atoms() if a.name == "CA") for r in prepared.topology.residues()]
    top_ca = x[[ca[int(t)] for t in protein.topology_residue_index]]
    d = np.linalg.norm(top_ca[pairs[:, 0]] - top_ca[pairs[:, 1]], axis=-1)
    assert ((d >= DISULFIDE_CA_RANGE_NM[0]) & (d <= DISULFIDE_CA_RANGE_NM[1])).all(), d
