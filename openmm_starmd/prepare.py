"""Structure preparation: a raw PDB/mmCIF file → a clean, protonated protein ready for OpenMM.

STAR-MD is trained on ATLAS, whose trajectories start from PDB chains that were cleaned,
protonated and simulated with a standard force field. This module is the first step of that
pipeline for our own reference MD (``training/simulate.py``) and for users starting a STAR-MD
rollout from a PDB file: it wraps PDBFixer and refuses, with a one-sentence error, anything
that a plain implicit- or explicit-solvent protein simulation would silently get wrong.

Choices made where the paper (and ATLAS) is silent:

- Ligands, ions, crystallisation additives and (by default) water are removed and reported in
  :attr:`PreparedProtein.removed` as ``{residue name: count}``.
- Existing hydrogens *and deuteriums* are stripped before hydrogens are rebuilt at the
  requested pH: neutron structures (e.g. BPTI 5PTI) carry D atoms that force fields do not know,
  and rebuilding all hydrogens gives consistent protonation states.
- Missing terminal residues are never built (ATLAS simulates the resolved construct); missing
  internal residues are an error unless ``build_missing=True`` (then PDBFixer models them from
  the SEQRES/entity sequence). A chain break that no sequence record explains (C–N distance
  above 0.2 nm) is always an error.
- Metal sites (a transition/alkaline-earth metal within 0.35 nm of a protein N, O or S) are an
  error unless ``allow_metals=True``, in which case the metal is removed with a warning: the
  standard force fields used here have no parameters for metal coordination, and a zinc finger
  without its zinc unfolds.
- Non-standard residues inside a chain (e.g. MSE) are an error naming them; with
  ``replace_nonstandard=True`` PDBFixer replaces those it knows by their parent residue.
- Files with several models (NMR ensembles) use model 1 and record a warning.
- Missing heavy atoms and hydrogens are placed with fixed seeds (PDBFixer's integrator seed and
  Python's ``random``, which OpenMM's Modeller uses), so preparation is deterministic.
"""
from __future__ import annotations

import io
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Union

import numpy as np
import openmm as mm
import openmm.app as app
import openmm.unit as unit
from openmm.app import element as elem
from pdbfixer import PDBFixer
from pdbfixer.pdbfixer import proteinResidues, substitutions

__all__ = ["PreparedProtein", "PreparationError", "prepare_protein", "METAL_SYMBOLS"]

#: Elements treated as metal sites when they sit next to a protein N/O/S. Na, K and Cl are
#: plain counter-ions in crystal/MD files and are removed silently.
METAL_SYMBOLS = frozenset(
    "Zn Fe Cu Mn Co Ni Mg Ca Cd Hg Mo W Pt Pd Ag Au Sr Ba Al Ga V Cr Ru Rh Os Ir Pb Tl Y La Gd Tb Eu Yb Sm Li".split()
)
_METAL_SITE_CUTOFF_NM = 0.35
_PEPTIDE_BREAK_NM = 0.2  # a C–N peptide bond is 0.133 nm; anything above 0.2 nm is a gap
_WATER_NAMES = frozenset({"HOH", "WAT", "DOD", "H2O", "SOL", "TIP3", "TIP", "T3P", "SPC"})


class PreparationError(ValueError):
    """A structure cannot be prepared for simulation; the message names the file, problem and fix."""


@dataclass
class PreparedProtein:
    """A cleaned, protonated protein.

    Attributes
    ----------
    topology : openmm.app.Topology
        Protein (and water if kept) with all hydrogens.
    positions : openmm.unit.Quantity, shape=(n_atoms, 3), nm
    removed : dict[str, int]
        Residues removed, by residue name (ligands, ions, water; metal ions when allowed).
    added : dict
        ``{"hydrogens": int, "heavy_atoms": int, "residues": list[str]}``: what PDBFixer built.
    stripped_hydrogens : int
        H/D atoms present in the input that were removed before rebuilding hydrogens.
    warnings : list[str]
        Non-fatal remarks (extra models ignored, metals removed, ...).
    source : str
        Where the structure came from (path or ``"<stream>"``).
    """

    topology: app.Topology
    positions: unit.Quantity
    removed: dict = field(default_factory=dict)
    added: dict = field(default_factory=dict)
    stripped_hydrogens: int = 0
    warnings: list = field(default_factory=list)
    source: str = "<stream>"

    @property
    def n_residues(self) -> int:
        """Number of residues in the prepared topology."""
        return self.topology.getNumResidues()

    def write_pdb(self, path) -> None:
        """Write the prepared structure to ``path`` (PDB, original residue ids kept)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            app.PDBFile.writeFile(self.topology, self.positions, fh, keepIds=True)
        os.replace(tmp, path)


def _read_fixer(path_or_file, name: str) -> tuple[PDBFixer, int]:
    """Open a PDB/mmCIF path or text stream with PDBFixer; return it and the number of models."""
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        if not os.path.exists(path):
            raise PreparationError(f"{path}: file not found; pass the path of a PDB or mmCIF file.")
        with open(path) as fh:
            text = fh.read()
    else:
        text = path_or_file.read()
        if isinstance(text, bytes):
            text = text.decode()
    if not text.strip():
        raise PreparationError(f"{name}: file is empty; pass a PDB or mmCIF file with protein atoms.")
    is_cif = name.lower().endswith((".cif", ".mmcif")) or text.lstrip().startswith("data_")
    try:
        if is_cif:
            fixer = PDBFixer(pdbxfile=io.StringIO(text))
            n_models = app.PDBxFile(io.StringIO(text)).getNumFrames()
        else:
            fixer = PDBFixer(pdbfile=io.StringIO(text))
            n_models = max(1, sum(1 for line in text.splitlines() if line.startswith("MODEL ")))
    except Exception as exc:  # PDBFixer raises bare Exceptions and ValueErrors for bad files
        raise PreparationError(
            f"{name}: could not be read as {'mmCIF' if is_cif else 'PDB'} ({exc}); "
            "check the file, or rewrite it with mdtraj/PyMOL to fix malformed columns."
        ) from exc
    return fixer, n_models


def _is_hydrogen(atom) -> bool:
    if atom.element is not None:
        return atom.element in (elem.hydrogen, elem.deuterium)
    return atom.name.lstrip("0123456789")[:1] in ("H", "D")


def _protein_residue_names() -> set[str]:
    return set(proteinResidues)


def _nonstandard_in_chains(topology) -> list:
    """Residues inside a protein chain (between its first and last standard residue) that are
    neither standard amino acids nor water/ions: modified residues a force field can't handle."""
    std = _protein_residue_names()
    found = []
    for chain in topology.chains():
        residues = list(chain.residues())
        idx = [i for i, r in enumerate(residues) if r.name in std]
        if not idx:
            continue
        for r in residues[idx[0] : idx[-1] + 1]:
            if r.name not in std and r.name not in _WATER_NAMES:
                found.append(r)
    return found


def _metal_sites(topology, positions_nm: np.ndarray) -> list[str]:
    """Describe metal atoms within the metal-site cutoff of a protein N/O/S atom."""
    std = _protein_residue_names()
    ligand_idx = [
        a.index
        for a in topology.atoms()
        if a.residue.name in std and a.element is not None and a.element.symbol in ("N", "O", "S")
    ]
    sites = []
    if not ligand_idx:
        return sites
    lig = positions_nm[ligand_idx]
    for a in topology.atoms():
        if a.element is not None and a.element.symbol in METAL_SYMBOLS and a.residue.name not in std:
            d = np.linalg.norm(lig - positions_nm[a.index], axis=1).min()
            if d < _METAL_SITE_CUTOFF_NM:
                sites.append(f"{a.residue.name}{a.residue.id}:{a.residue.chain.id}")
    return sites


def _chain_breaks(topology, positions_nm: np.ndarray, skip: set) -> list[str]:
    """C(i)–N(i+1) gaps longer than a peptide bond between consecutive protein residues.

    ``skip`` holds (chain index, residue index within chain) positions where missing residues
    will be inserted, so those gaps are not reported."""
    std = _protein_residue_names()
    breaks = []
    for chain in topology.chains():
        residues = [r for r in chain.residues() if r.name in std]
        for k in range(len(residues) - 1):
            a, b = residues[k], residues[k + 1]
            c = next((x for x in a.atoms() if x.name == "C"), None)
            n = next((x for x in b.atoms() if x.name == "N"), None)
            if c is None or n is None:
                continue
            if (chain.index, k + 1) in skip:
                continue
            d = float(np.linalg.norm(positions_nm[c.index] - positions_nm[n.index]))
            if d > _PEPTIDE_BREAK_NM:
                breaks.append(f"{a.name}{a.id}-{b.name}{b.id}:{chain.id} ({d:.2f} nm)")
    return breaks


def _positions_nm(positions) -> np.ndarray:
    return np.asarray(positions.value_in_unit(unit.nanometer), dtype=float).reshape(-1, 3)


def prepare_protein(
    path_or_file: Union[str, os.PathLike, IO],
    ph: float = 7.0,
    build_missing: bool = False,
    keep_water: bool = False,
    allow_metals: bool = False,
    replace_nonstandard: bool = False,
    name: str | None = None,
) -> PreparedProtein:
    """Clean and protonate a protein structure with PDBFixer.

    Parameters
    ----------
    path_or_file : str, os.PathLike or text stream
        A PDB or PDBx/mmCIF file. Only model 1 of multi-model files is used (with a warning).
    ph : float
        pH used to choose protonation states of titratable residues.
    build_missing : bool
        Build missing *internal* residues from the sequence record; terminal ones are never built.
    keep_water : bool
        Keep crystallographic water (for explicit-solvent runs); other heterogens always go.
    allow_metals : bool
        Remove metal ions that coordinate the protein instead of refusing the structure.
    replace_nonstandard : bool
        Replace non-standard residues that PDBFixer knows (MSE→MET, ...) by their parent.
    name : str, optional
        Name used in messages; defaults to the path.

    Returns
    -------
    PreparedProtein

    Raises
    ------
    PreparationError
        Missing file, no protein, unreadable file, non-standard residues, metal sites, missing
        internal residues or unexplained chain breaks.
    """
    if name is None:
        name = os.fspath(path_or_file) if isinstance(path_or_file, (str, os.PathLike)) else getattr(
            path_or_file, "name", "<stream>"
        )
    fixer, n_models = _read_fixer(path_or_file, str(name))
    notes: list[str] = []
    if n_models > 1:
        notes.append(f"{name}: {n_models} models found; using model 1.")
        warnings.warn(notes[-1], stacklevel=2)

    std = _protein_residue_names()
    n_protein = sum(1 for r in fixer.topology.residues() if r.name in std or r.name in substitutions)
    if n_protein == 0:
        raise PreparationError(
            f"{name}: contains no standard protein residues; pass a structure with a protein chain."
        )

    # Non-standard residues must be handled before removeHeterogens, which would silently delete
    # them and leave a hole in the chain.
    fixer.findNonstandardResidues()
    known = {r: repl for r, repl in fixer.nonstandardResidues}
    unknown = [r for r in _nonstandard_in_chains(fixer.topology) if r not in known]
    if unknown or (known and not replace_nonstandard):
        names = ", ".join(f"{r.name}{r.id}:{r.chain.id}" for r in (unknown or list(known)))
        fix = (
            "use replace_nonstandard=True to replace them by their standard parent"
            if not unknown
            else "mutate them to standard residues (e.g. with PDBFixer.applyMutations) before preparing"
        )
        raise PreparationError(f"{name}: non-standard residues {names}; {fix}.")
    if known:
        fixer.replaceNonstandardResidues()

    pos_nm = _positions_nm(fixer.positions)
    sites = _metal_sites(fixer.topology, pos_nm)
    if sites:
        if not allow_metals:
            raise PreparationError(
                f"{name}: metal sites {', '.join(sites)} need parameters the force field lacks; "
                "choose another structure or pass allow_metals=True to simulate without the metals."
            )
        notes.append(f"{name}: metal sites {', '.join(sites)} removed (allow_metals=True).")
        warnings.warn(notes[-1], stacklevel=2)

    # PDBFixer keeps protein, nucleic acids and (optionally) water named HOH; other water names
    # (DOD, WAT) count as removed.
    removed = Counter(r.name for r in fixer.removeHeterogens(keepWater=keep_water))

    # Neutron structures carry deuterium; rebuild every hydrogen from templates instead.
    h_atoms = [a for a in fixer.topology.atoms() if _is_hydrogen(a)]
    if h_atoms:
        modeller = app.Modeller(fixer.topology, fixer.positions)
        modeller.delete(h_atoms)
        fixer.topology, fixer.positions = modeller.topology, modeller.positions

    fixer.findMissingResidues()
    chain_len = {c.index: len(list(c.residues())) for c in fixer.topology.chains()}
    internal = {}
    for (ci, ri), names in list(fixer.missingResidues.items()):
        if ri == 0 or ri == chain_len[ci]:
            del fixer.missingResidues[(ci, ri)]  # never build termini
        else:
            internal[(ci, ri)] = names
    if internal and not build_missing:
        chains = list(fixer.topology.chains())
        desc = "; ".join(
            f"{len(n)} ({'-'.join(n)}) in chain {chains[ci].id} before "
            f"{(r := list(chains[ci].residues())[ri]).name}{r.id}"
            for (ci, ri), n in internal.items()
        )
        raise PreparationError(
            f"{name}: missing internal residues ({desc}); pass build_missing=True to model them or choose a complete structure."
        )
    breaks = _chain_breaks(fixer.topology, _positions_nm(fixer.positions), set(internal))
    if breaks:
        raise PreparationError(
            f"{name}: chain breaks without a sequence record at {', '.join(breaks)}; "
            "use a complete structure or one with SEQRES records and build_missing=True."
        )

    fixer.findMissingAtoms()
    built = [n for names in internal.values() for n in names]
    n_before = fixer.topology.getNumAtoms()
    # Modeller places new atoms from Python's global `random`; seed it (and put the caller's
    # state back) so the same input always gives the same structure.
    # The Reference platform makes PDBFixer's small minimisations bit-reproducible (threaded
    # CPU force sums are not) at a cost of a fraction of a second.
    fixer.platform = mm.Platform.getPlatformByName("Reference")
    saved = random.getstate()
    try:
        random.seed(0)
        fixer.addMissingAtoms(seed=0)
        n_after_heavy = fixer.topology.getNumAtoms()
        fixer.addMissingHydrogens(pH=ph)
    finally:
        random.setstate(saved)
    n_h = fixer.topology.getNumAtoms() - n_after_heavy

    return PreparedProtein(
        topology=fixer.topology,
        positions=fixer.positions,
        removed=dict(removed),
        added={"hydrogens": n_h, "heavy_atoms": n_after_heavy - n_before, "residues": built},
        stripped_hydrogens=len(h_atoms),
        warnings=notes,
        source=str(name),
    )
