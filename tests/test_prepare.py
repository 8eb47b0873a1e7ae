"""prepare_protein on real structures: what it removes, rebuilds and refuses.

The structures are the real PDB files of tests/data; the bad inputs are those files edited line
by line (each helper says how), so every refusal is tested on otherwise real coordinates.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import openmm.app as app
import openmm.unit as unit
import pytest

from openmm_starmd.prepare import PreparationError, PreparedProtein, prepare_protein


def _lines(path: Path) -> list[str]:
    return Path(path).read_text().splitlines()


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    out = tmp_path / name
    out.write_text("\n".join(lines) + "\nEND\n")
    return out


def _set(line: str, start: int, stop: int, text: str) -> str:
    width = stop - start
    return line[:start] + text.rjust(width)[:width] + line[stop:]


def _counts(topology) -> dict:
    n_h = sum(1 for a in topology.atoms() if a.element is app.element.hydrogen)
    return {"atoms": topology.getNumAtoms(), "H": n_h, "residues": topology.getNumResidues()}


def _builds_amber_system(prepared: PreparedProtein) -> bool:
    """The real test of a prepared structure: a standard force field accepts every residue."""
    ff = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = ff.createSystem(prepared.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    return system.getNumParticles() == prepared.topology.getNumAtoms()


def test_ubiquitin_waters_removed_and_reported(ubiquitin_pdb):
    p = prepare_protein(ubiquitin_pdb)
    assert p.removed == {"HOH": 81}
    assert p.n_residues == 76
    assert p.added["hydrogens"] > 500
    assert p.stripped_hydrogens == 0
    assert not any(r.name == "HOH" for r in p.topology.residues())
    assert _builds_amber_system(p)


def test_keep_water(ubiquitin_pdb):
    p = prepare_protein(ubiquitin_pdb, keep_water=True)
    assert p.removed == {}
    assert sum(1 for r in p.topology.residues() if r.name == "HOH") == 81


def test_existing_hydrogens_are_rebuilt_and_deuterium_is_stripped(crambin_pdb, tmp_path):
    ref = prepare_protein(crambin_pdb)
    assert ref.stripped_hydrogens == 415 - 1 or ref.stripped_hydrogens > 300
    # A neutron-style copy: every H becomes D (atom name and element columns).
    lines = []
    for l in _lines(crambin_pdb):
        if l.startswith(("ATOM  ", "HETATM")) and l[76:78].strip() == "H":
            name = l[12:16]
            l = l[:12] + name.replace("H", "D", 1) + l[16:]
            l = _set(l, 76, 78, "D")
        lines.append(l)
    deut = prepare_protein(_write(tmp_path, "crambin_deuterated.pdb", lines))
    assert deut.stripped_hydrogens == ref.stripped_hydrogens
    assert not any(a.element is app.element.deuterium for a in deut.topology.atoms())
    assert _counts(deut.topology) == _counts(ref.topology)
    assert _builds_amber_system(deut)


def test_ions_and_ligand_removed_and_named(hetero_pdb):
    p = prepare_protein(hetero_pdb)
    assert p.removed == {"HOH": 79, "NA": 1, "CL": 1, "SAH": 1}
    assert _builds_amber_system(p)


def test_multiple_models_use_model_one_with_warning(nmr_models_pdb):
    with pytest.warns(UserWarning, match="3 models"):
        p = prepare_protein(nmr_models_pdb)
    assert p.n_residues == 10
    assert any("model 1" in w for w in p.warnings)
    first = app.PDBFile(str(nmr_models_pdb)).getPositions(asNumpy=True, frame=0)
    ca = [a.index for a in p.topology.atoms() if a.name == "CA"]
    ca_in = [a.index for a in app.PDBFile(str(nmr_models_pdb)).topology.atoms() if a.name == "CA"]
    got = p.positions.value_in_unit(unit.nanometer)
    for i, j in zip(ca, ca_in):
        assert abs(got[i][0] - first[j][0].value_in_unit(unit.nanometer)) < 1e-6


def test_nonstandard_residue_is_named_and_optionally_replaced(nonstandard_pdb):
    with pytest.raises(PreparationError, match=r"MSE1:A.*replace_nonstandard=True"):
        prepare_protein(nonstandard_pdb)
    p = prepare_protein(nonstandard_pdb, replace_nonstandard=True)
    assert next(p.topology.residues()).name == "MET"
    assert _builds_amber_system(p)


def test_metal_site_refused_unless_allowed(ubiquitin_pdb, tmp_path):
    """A Zn placed 0.21 nm from the OD1 of Asp 21 of 1UBI (a carboxylate metal site)."""
    lines = [l for l in _lines(ubiquitin_pdb) if l.startswith("ATOM  ")]
    od1 = next(l for l in lines if l[17:20] == "ASP" and int(l[22:26]) == 21 and l[12:16].strip() == "OD1")
    x, y, z = (float(od1[30:38]), float(od1[38:46]), float(od1[46:54]))
    zn = f"HETATM 9999 ZN    ZN A 101    {x + 2.1:8.3f}{y:8.3f}{z:8.3f}  1.00 20.00          ZN"
    path = _write(tmp_path, "ubiquitin_zn.pdb", lines + ["TER", zn])
    with pytest.raises(PreparationError, match=r"metal sites ZN101:A.*allow_metals=True"):
        prepare_protein(path)
    with pytest.warns(UserWarning, match="removed"):
        p = prepare_protein(path, allow_metals=True)
    assert p.removed == {"ZN": 1}


def test_missing_internal_residues_refused_or_built(ubiquitin_pdb, tmp_path):
    """1UBI with residues 30-32 deleted; SEQRES still lists them."""
    lines = [l for l in _lines(ubiquitin_pdb)
             if not (l.startswith("ATOM  ") and 30 <= int(l[22:26]) <= 32) and not l.startswith("HETATM")]
    path = _write(tmp_path, "ubiquitin_gap.pdb", lines)
    with pytest.raises(PreparationError, match=r"missing internal residues.*ILE-GLN-ASP.*build_missing=True"):
        prepare_protein(path)
    p = prepare_protein(path, build_missing=True)
    assert p.n_residues == 76
    assert p.added["residues"] == ["ILE", "GLN", "ASP"]
    assert _builds_amber_system(p)


def test_chain_break_without_sequence_record_refused(ubiquitin_pdb, tmp_path):
    lines = [l for l in _lines(ubiquitin_pdb)
             if l.startswith("ATOM  ") and not 30 <= int(l[22:26]) <= 32]
    with pytest.raises(PreparationError, match=r"chain breaks.*LYS29-LYS33:A"):
        prepare_protein(_write(tmp_path, "ubiquitin_break.pdb", lines), build_missing=True)


def test_missing_terminal_residues_not_built(ubiquitin_pdb, tmp_path):
    lines = [l for l in _lines(ubiquitin_pdb) if not (l.startswith("ATOM  ") and int(l[22:26]) >= 74)]
    p = prepare_protein(_write(tmp_path, "ubiquitin_cterm.pdb", lines))
    assert p.n_residues == 73


def test_missing_heavy_atoms_added(ubiquitin_pdb, tmp_path):
    """1UBI with the side chain of Lys 6 cut back to CB."""
    lines = [l for l in _lines(ubiquitin_pdb)
             if not (l.startswith("ATOM  ") and int(l[22:26]) == 6 and l[12:16].strip() in ("CG", "CD", "CE", "NZ"))]
    p = prepare_protein(_write(tmp_path, "ubiquitin_lys6.pdb", lines))
    assert p.added["heavy_atoms"] == 4
    lys6 = [r for r in p.topology.residues() if r.id == "6"][0]
    assert {"CG", "CD", "CE", "NZ"} <= {a.name for a in lys6.atoms()}


def test_no_protein_refused(ubiquitin_pdb, tmp_path):
    waters = [l for l in _lines(ubiquitin_pdb) if l.startswith("HETATM")]
    with pytest.raises(PreparationError, match="no standard protein residues"):
        prepare_protein(_write(tmp_path, "waters.pdb", waters))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PreparationError, match="file not found"):
        prepare_protein(tmp_path / "nope.pdb")
    (tmp_path / "empty.pdb").write_text("")
    with pytest.raises(PreparationError, match="empty"):
        prepare_protein(tmp_path / "empty.pdb")


def test_mmcif_and_stream_inputs_match_pdb(ubiquitin_pdb, ubiquitin_cif):
    a = prepare_protein(ubiquitin_pdb)
    b = prepare_protein(ubiquitin_cif)
    with open(ubiquitin_pdb) as fh:
        c = prepare_protein(io.StringIO(fh.read()), name="ubq-stream")
    assert _counts(a.topology) == _counts(b.topology) == _counts(c.topology)
    assert c.source == "ubq-stream"


def test_write_pdb_round_trip(engrailed_pdb, tmp_path):
    p = prepare_protein(engrailed_pdb)
    out = tmp_path / "prepared.pdb"
    p.write_pdb(out)
    back = app.PDBFile(str(out))
    assert back.topology.getNumAtoms() == p.topology.getNumAtoms()
    assert [r.name for r in back.topology.residues()] == [r.name for r in p.topology.residues()]
    assert not (tmp_path / "prepared.pdb.tmp").exists()


def test_deterministic(ubiquitin_pdb):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = prepare_protein(ubiquitin_pdb).positions.value_in_unit(unit.nanometer)
        b = prepare_protein(ubiquitin_pdb).positions.value_in_unit(unit.nanometer)
    assert all(tuple(x) == tuple(y) for x, y in zip(a, b))
