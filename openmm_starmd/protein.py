"""Protein input: an OpenMM Topology (or a PDB/mmCIF file) -> what STAR-MD conditions on.

STAR-MD's tokens are one rigid frame per residue plus the residue type; this module finds the
protein residues of a structure and returns their sequence, chain layout, backbone (N, CA, C,
O in nm) and masks as a :class:`ProteinInput`, plus, for each residue, the indices of all of
its atoms in the Topology so that generated frames can later be mapped back onto the system.

Choices made here (the paper works on clean, single-chain ATLAS proteins and says nothing):

* Residue types use AlphaFold's order ``ARNDCQEGHILKMFPSTWYV`` (aatype 0..19); 20 is
  unknown (``X``): residues named ``UNK``, or mapped to ``"UNK"`` through ``residue_map``.
* Force-field protonation and terminal aliases are the standard residue: HID/HIE/HIP/HSD/
  HSE/HSP/HISD/HISE/HISH/HIH/HSH -> H, CYX/CYM/CYS2 -> C, ASH/ASPP/ASPH -> D, GLH/GLUP/GLUH
  -> E, LYN/LSN/LYSH -> K, ARN -> R, TYM -> Y, and Amber's terminal forms such as NALA/CALA.
  (PDBFile already renames some of these on reading; a Topology from Amber, CHARMM or
  GROMACS files keeps them.)
* Other residues with N, CA and C atoms that are peptide-bonded (C-N within 0.2 nm) to a
  neighbour in their chain (MSE, SEP, ...) are non-standard amino acids: an error naming
  them, unless ``residue_map`` says what to treat them as (``{"MSE": "MET"}``). Nothing is
  guessed, because a wrong residue type silently changes the model's input. Unbonded ones
  (cofactors such as SAH) are ligands. Distances, not Topology bonds, decide, because
  readers only bond non-standard residues when the file has CONECT/struct_conn records.
* Terminal caps (ACE, NME/NMA, NH2/NHE, FOR), water, ions, nucleic acids and ligands are not
  protein tokens: they are skipped, not an error, and listed in ``ProteinInput.skipped`` with
  their atom indices so a caller can still move or restrain them.
* Chains are the Topology's chains that hold at least one amino acid, numbered 0, 1, ... in
  file order; ``residue_index`` counts residues present in each chain from 0, and
  ``author_residue_ids`` keeps the file's numbering (with insertion code).
* Backbone O is read from ``O`` or its C-terminal aliases (``OT1``, ``O1``, ``OC1``,
  ``OCT1``). Missing backbone atoms are an error unless ``allow_missing=True``; then their
  coordinates are zero, ``atom_mask`` is False there and ``mask`` marks residues whose N, CA
  and C are all present (the atoms a frame needs).

Structure preparation (adding missing atoms, replacing non-standard residues) is PDBFixer's
job, in :mod:`openmm_starmd.prepare`; this module only reads.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import numpy as np
import openmm.unit as unit
import torch
from openmm.app import PDBFile, PDBxFile, Topology

from .geometry.frames import frames_from_backbone
from .geometry.rigid import Rigid

__all__ = [
    "RESTYPES",
    "UNKNOWN_AATYPE",
    "BACKBONE_ATOMS",
    "ProteinInputError",
    "SkippedResidue",
    "ProteinInput",
    "read_structure",
    "extract_protein",
    "load_protein",
    "disulfide_pairs",
    "disulfide_bounds",
    "DISULFIDE_CA_RANGE_NM",
]

#: Cα–Cα distance range (nm) of disulfide-bonded cysteines: ~4.4-6.8 Å in crystal structures; the
#: lower bound is loosened to 4.0 Å so only clearly impossible pairs are moved.
DISULFIDE_CA_RANGE_NM = (0.40, 0.68)

RESTYPES = "ARNDCQEGHILKMFPSTWYV"
UNKNOWN_AATYPE = 20
BACKBONE_ATOMS = ("N", "CA", "C", "O")

_THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C",
    "GLN": "Q", "GLU": "E", "GLY": "G", "HIS": "H", "ILE": "I",
    "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P",
    "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V",
}
_ALIASES = {
    "HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HIH": "HIS", "HSD": "HIS", "HSE": "HIS",
    "HSP": "HIS", "HSH": "HIS", "HISD": "HIS", "HISE": "HIS", "HISH": "HIS", "HISA": "HIS",
    "HISB": "HIS",
    "CYX": "CYS", "CYM": "CYS", "CYS2": "CYS",
    "ASH": "ASP", "ASPP": "ASP", "ASPH": "ASP",
    "GLH": "GLU", "GLUP": "GLU", "GLUH": "GLU",
    "LYN": "LYS", "LSN": "LYS", "LYSH": "LYS",
    "ARN": "ARG", "TYM": "TYR",
}
_CAPS = {"ACE", "NME", "NMA", "NH2", "NHE", "FOR"}
_WATERS = {"HOH", "WAT", "SOL", "H2O", "DOD", "TIP", "TIP3", "TIP4", "TIP5", "TP3", "T3P", "T4P", "T5P", "SPC"}
_IONS = {
    "NA", "CL", "K", "MG", "CA", "ZN", "MN", "FE", "FE2", "CU", "CU1", "CO", "NI", "CD", "HG",
    "LI", "RB", "CS", "BR", "IOD", "F", "SR", "BA", "NA+", "CL-", "K+", "SOD", "CLA", "POT",
    "CAL", "CES", "LIT", "RUB", "ZN2", "MG2",
}
_NUCLEIC = {
    "A", "C", "G", "U", "I", "DA", "DC", "DG", "DT", "DI", "DU", "ADE", "GUA", "CYT", "URA",
    "THY", "RA", "RC", "RG", "RU",
} | {base + end for base in ("A", "C", "G", "U", "DA", "DC", "DG", "DT", "RA", "RC", "RG", "RU") for end in "35N"}
_O_NAMES = ("O", "OT1", "O1", "OC1", "OCT1")
_PEPTIDE_BOND_CUTOFF_NM = 0.2


class ProteinInputError(ValueError):
    """A structure cannot be turned into STAR-MD protein input; the message says how to fix it."""


class SkippedResidue(NamedTuple):
    """A Topology residue that is not a protein token.

    kind : one of "cap", "water", "ion", "nucleic", "ligand".
    name, chain_id, residue_id : as in the Topology (residue_id includes any insertion code).
    topology_index : the residue's index in the Topology.
    atom_indices : (n_atoms,) int64 indices of its atoms in the Topology.
    """

    kind: str
    name: str
    chain_id: str
    residue_id: str
    topology_index: int
    atom_indices: np.ndarray


@dataclass(frozen=True, eq=False)
class ProteinInput:
    """The protein part of a structure, one entry per amino-acid residue, in chain order.

    Attributes
    ----------
    sequence : str, length N
        One-letter codes of all chains concatenated, ``X`` for unknown.
    aatype : np.ndarray of int64, shape=(N,)
        Index into :data:`RESTYPES`; :data:`UNKNOWN_AATYPE` (20) for unknown.
    backbone_nm : np.ndarray of float32, shape=(N, 4, 3), nm
        N, CA, C, O positions; zero where ``atom_mask`` is False.
    atom_mask : np.ndarray of bool, shape=(N, 4)
        Which of N, CA, C, O are present.
    mask : np.ndarray of bool, shape=(N,)
        Residues with N, CA and C present (a frame is defined).
    residue_index : np.ndarray of int64, shape=(N,)
        0-based position of the residue within its chain.
    author_residue_ids : tuple of str, length N
        Residue numbers as written in the file/Topology, with insertion code (``"52A"``).
    chain_index : np.ndarray of int64, shape=(N,)
        0-based index into ``chain_ids``.
    chain_ids : tuple of str, one per protein chain
        Topology chain ids.
    residue_names : tuple of str, length N
        Residue names as in the Topology (``"HID"``, ``"MSE"``, ...).
    topology_residue_index : np.ndarray of int64, shape=(N,)
        Index of each residue in the Topology.
    atom_indices : tuple of np.ndarray of int64, length N
        For each residue, the Topology indices of all its atoms (hydrogens included).
    skipped : tuple of SkippedResidue
        Non-protein residues (caps, water, ions, nucleic acids, ligands) that were left out.
    """

    sequence: str
    aatype: np.ndarray
    backbone_nm: np.ndarray
    atom_mask: np.ndarray
    mask: np.ndarray
    residue_index: np.ndarray
    author_residue_ids: tuple[str, ...]
    chain_index: np.ndarray
    chain_ids: tuple[str, ...]
    residue_names: tuple[str, ...]
    topology_residue_index: np.ndarray
    atom_indices: tuple[np.ndarray, ...]
    skipped: tuple[SkippedResidue, ...] = ()

    def __post_init__(self):
        n = len(self.sequence)
        shapes = {
            "aatype": (self.aatype.shape, (n,)),
            "backbone_nm": (self.backbone_nm.shape, (n, 4, 3)),
            "atom_mask": (self.atom_mask.shape, (n, 4)),
            "mask": (self.mask.shape, (n,)),
            "residue_index": (self.residue_index.shape, (n,)),
            "chain_index": (self.chain_index.shape, (n,)),
            "topology_residue_index": (self.topology_residue_index.shape, (n,)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise ProteinInputError(
                    f"ProteinInput.{name} has shape {got} but the sequence has {n} residues; give it shape {want}."
                )
        for name in ("author_residue_ids", "residue_names", "atom_indices"):
            if len(getattr(self, name)) != n:
                raise ProteinInputError(
                    f"ProteinInput.{name} has {len(getattr(self, name))} entries for {n} residues; give one per residue."
                )

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def n_residues(self) -> int:
        """Number of protein residues N."""
        return len(self.sequence)

    @property
    def chain_sequences(self) -> tuple[str, ...]:
        """One-letter sequence of each protein chain, in ``chain_ids`` order."""
        return tuple(
            "".join(s for s, c in zip(self.sequence, self.chain_index) if c == i) for i in range(len(self.chain_ids))
        )

    def frames(self, dtype: torch.dtype = torch.float32) -> Rigid:
        """Residue frames of the backbone (identity rotation where ``mask`` is False).

        Returns
        -------
        Rigid
            rots (N, 3, 3), trans (N, 3) in nm; see :mod:`openmm_starmd.geometry.frames`.
        """
        bb = torch.as_tensor(self.backbone_nm, dtype=dtype)
        return frames_from_backbone(bb[:, 0], bb[:, 1], bb[:, 2], torch.as_tensor(self.mask))


def read_structure(path: str | os.PathLike, model: int | None = None) -> tuple[Topology, unit.Quantity]:
    """Read a PDB or PDBx/mmCIF file (optionally gzipped) with OpenMM.

    Alternate locations are resolved by OpenMM's readers (the first one listed is kept).

    Parameters
    ----------
    path : str or path-like
        ``.pdb``/``.ent`` or ``.cif``/``.mmcif``/``.pdbx``, with an optional ``.gz``.
    model : int, optional
        0-based model to use; required when the file holds more than one model.

    Returns
    -------
    topology : openmm.app.Topology
    positions : openmm.unit.Quantity, shape=(n_atoms, 3), length
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ProteinInputError(f"Structure file {path!r} does not exist; check the path.")
    name = path.lower()
    opened = gzip.open(path, "rt") if name.endswith(".gz") else open(path)
    stem = name[:-3] if name.endswith(".gz") else name
    with opened as handle:
        if stem.endswith((".cif", ".mmcif", ".pdbx")):
            structure = PDBxFile(handle)
        elif stem.endswith((".pdb", ".ent")):
            structure = PDBFile(handle)
        else:
            raise ProteinInputError(
                f"Structure file {path!r} has an unknown extension; "
                "use .pdb, .ent, .cif, .mmcif or .pdbx (optionally .gz)."
            )
    n_models = structure.getNumFrames()
    if model is None:
        if n_models > 1:
            raise ProteinInputError(
                f"Structure file {path!r} holds {n_models} models; pick one with model=0 .. model={n_models - 1}."
            )
        model = 0
    if not 0 <= model < n_models:
        raise ProteinInputError(
            f"model={model} is out of range for {path!r}, which holds {n_models} model(s); use 0 .. {n_models - 1}."
        )
    return structure.topology, structure.getPositions(asNumpy=True, frame=model)


def load_protein(
    path: str | os.PathLike,
    *,
    model: int | None = None,
    allow_missing: bool = False,
    residue_map: Mapping[str, str] | None = None,
) -> ProteinInput:
    """:func:`read_structure` followed by :func:`extract_protein`; see both for parameters."""
    topology, positions = read_structure(path, model=model)
    return extract_protein(topology, positions, allow_missing=allow_missing, residue_map=residue_map)


def _residue_label(residue) -> str:
    return f"{residue.name} {_residue_id(residue)} (chain {residue.chain.id})"


def _residue_id(residue) -> str:
    return f"{residue.id}{(getattr(residue, 'insertionCode', '') or '').strip()}"


def _list_residues(labels: list[str], limit: int = 5) -> str:
    shown = ", ".join(labels[:limit])
    return shown if len(labels) <= limit else f"{shown} and {len(labels) - limit} more"


def _standard_name(name: str) -> str | None:
    """Standard three-letter name for a residue name or alias, or None."""
    if name in _THREE_TO_ONE:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    # Amber's terminal residues: NALA, CHIE, ...
    if len(name) == 4 and name[0] in "NC":
        rest = name[1:]
        return rest if rest in _THREE_TO_ONE else _ALIASES.get(rest)
    return None


def _validated_map(residue_map: Mapping[str, str] | None) -> dict[str, int]:
    """residue_map {name: standard name or "UNK"} -> {NAME: aatype}."""
    out = {}
    for key, value in (residue_map or {}).items():
        target = str(value).strip().upper()
        standard = _standard_name(target)
        if standard is not None:
            out[str(key).strip().upper()] = RESTYPES.index(_THREE_TO_ONE[standard])
        elif target == "UNK":
            out[str(key).strip().upper()] = UNKNOWN_AATYPE
        else:
            raise ProteinInputError(
                f"residue_map[{key!r}] = {value!r} is not a standard amino acid; "
                "map it to a three-letter name such as 'MET', or to 'UNK'."
            )
    return out


def _classify(residue, atom_names: set[str], mapped: dict[str, int]) -> tuple[str, int]:
    """(kind, aatype) of a residue by name; kind is "amino", a skipped kind, or "amino-like"
    (unknown name with N, CA, C: non-standard amino acid or ligand, decided by bonding)."""
    name = residue.name.strip().upper()
    if name in mapped:
        return "amino", mapped[name]
    standard = _standard_name(name)
    if standard is not None:
        return "amino", RESTYPES.index(_THREE_TO_ONE[standard])
    if name == "UNK":
        return "amino", UNKNOWN_AATYPE
    if name in _CAPS:
        return "cap", -1
    if name in _WATERS:
        return "water", -1
    if name in _IONS or len(atom_names) == 1:
        return "ion", -1
    if name in _NUCLEIC:
        return "nucleic", -1
    if {"N", "CA", "C"} <= atom_names:
        return "amino-like", -1
    return "ligand", -1


def _peptide_bonded(k: int, atom_maps: list[dict[str, int]], xyz: np.ndarray) -> bool:
    """Whether residue k of a chain is peptide-bonded to the residue before or after it."""
    this = atom_maps[k]
    pairs = []
    if k > 0 and "C" in atom_maps[k - 1]:
        pairs.append((atom_maps[k - 1]["C"], this["N"]))
    if k + 1 < len(atom_maps) and "N" in atom_maps[k + 1]:
        pairs.append((this["C"], atom_maps[k + 1]["N"]))
    return any(np.linalg.norm(xyz[i] - xyz[j]) < _PEPTIDE_BOND_CUTOFF_NM for i, j in pairs)


def _positions_nm(topology: Topology, positions) -> np.ndarray:
    if not unit.is_quantity(positions):
        raise ProteinInputError(
            "positions must be an openmm.unit Quantity (for example pdb.positions); "
            "multiply a bare array by openmm.unit.nanometer."
        )
    try:
        xyz = np.asarray(positions.value_in_unit(unit.nanometer), dtype=np.float64)
    except TypeError as err:  # incompatible units raise TypeError in openmm.unit
        raise ProteinInputError(
            f"positions have unit {positions.unit}, not a length; pass positions in nm or Å."
        ) from err
    if xyz.shape != (topology.getNumAtoms(), 3):
        raise ProteinInputError(
            f"positions have shape {xyz.shape} but the topology has {topology.getNumAtoms()} atoms; "
            "pass one (x, y, z) per atom of this topology."
        )
    return xyz


def extract_protein(
    topology: Topology,
    positions: unit.Quantity,
    *,
    allow_missing: bool = False,
    residue_map: Mapping[str, str] | None = None,
) -> ProteinInput:
    """The protein residues of an OpenMM system, as STAR-MD input.

    Parameters
    ----------
    topology : openmm.app.Topology
    positions : openmm.unit.Quantity, shape=(n_atoms, 3), length
        Positions of every atom of ``topology`` (``pdb.positions``, ``state.getPositions()``).
    allow_missing : bool
        If False (default), any protein residue lacking N, CA, C or O is an error. If True,
        such residues are kept and masked (see :class:`ProteinInput`).
    residue_map : mapping of str to str, optional
        Extra residue names and the standard residue (three-letter name or ``"UNK"``) to treat
        them as, e.g. ``{"MSE": "MET"}``; takes precedence over the built-in names.

    Returns
    -------
    ProteinInput

    Raises
    ------
    ProteinInputError
        No protein residues; non-standard amino acids not in ``residue_map``; missing backbone
        atoms without ``allow_missing``; positions that are not a length Quantity per atom.
    """
    xyz = _positions_nm(topology, positions)
    mapped = _validated_map(residue_map)

    seq, aatype, backbone, atom_mask = [], [], [], []
    residue_index, author_ids, chain_index, names, topo_index, atom_indices = [], [], [], [], [], []
    chain_ids, skipped, nonstandard, missing = [], [], [], []

    for chain in topology.chains():
        in_chain = 0
        residues = list(chain.residues())
        atom_maps = []
        for residue in residues:
            by_name = {}
            for atom in residue.atoms():
                by_name.setdefault(atom.name.strip().upper(), atom.index)
            atom_maps.append(by_name)
        for k, (residue, by_name) in enumerate(zip(residues, atom_maps)):
            kind, restype = _classify(residue, set(by_name), mapped)
            if kind == "amino-like":
                kind = "nonstandard" if _peptide_bonded(k, atom_maps, xyz) else "ligand"
            indices = np.array([a.index for a in residue.atoms()], dtype=np.int64)
            if kind == "nonstandard":
                nonstandard.append(_residue_label(residue))
                continue
            if kind != "amino":
                skipped.append(
                    SkippedResidue(kind, residue.name, chain.id, _residue_id(residue), residue.index, indices)
                )
                continue
            if in_chain == 0:
                chain_ids.append(chain.id)
            found = [by_name.get(n) for n in BACKBONE_ATOMS[:3]]
            found.append(next((by_name[o] for o in _O_NAMES if o in by_name), None))
            present = [i is not None for i in found]
            if not all(present):
                lacking = "/".join(n for n, p in zip(BACKBONE_ATOMS, present) if not p)
                missing.append(f"{_residue_label(residue)} lacks {lacking}")
            backbone.append([xyz[i] if i is not None else np.zeros(3) for i in found])
            atom_mask.append(present)
            seq.append(RESTYPES[restype] if restype < UNKNOWN_AATYPE else "X")
            aatype.append(restype)
            residue_index.append(in_chain)
            author_ids.append(_residue_id(residue))
            chain_index.append(len(chain_ids) - 1)
            names.append(residue.name)
            topo_index.append(residue.index)
            atom_indices.append(indices)
            in_chain += 1

    if nonstandard:
        raise ProteinInputError(
            f"Non-standard amino acid(s) {_list_residues(nonstandard)} are not among the 20 STAR-MD residue types; "
            "pass residue_map={'NAME': 'STANDARD'} (e.g. {'MSE': 'MET'}) "
            "or replace them with openmm_starmd.prepare_protein (PDBFixer)."
        )
    if not seq:
        kinds = sorted({s.kind for s in skipped})
        found = f" (found only: {', '.join(kinds)})" if kinds else ""
        raise ProteinInputError(
            f"The topology holds no protein residues{found}; pass a structure that contains a protein."
        )
    if missing and not allow_missing:
        raise ProteinInputError(
            f"Missing backbone atoms: {_list_residues(missing)}; "
            "rebuild them with openmm_starmd.prepare_protein (PDBFixer) or pass allow_missing=True to mask those residues."
        )

    atom_mask = np.array(atom_mask, dtype=bool)
    return ProteinInput(
        sequence="".join(seq),
        aatype=np.array(aatype, dtype=np.int64),
        backbone_nm=np.array(backbone, dtype=np.float32),
        atom_mask=atom_mask,
        mask=atom_mask[:, :3].all(-1),
        residue_index=np.array(residue_index, dtype=np.int64),
        author_residue_ids=tuple(author_ids),
        chain_index=np.array(chain_index, dtype=np.int64),
        chain_ids=tuple(chain_ids),
        residue_names=tuple(names),
        topology_residue_index=np.array(topo_index, dtype=np.int64),
        atom_indices=tuple(atom_indices),
        skipped=tuple(skipped),
    )


def disulfide_pairs(topology, topology_residue_index) -> np.ndarray:
    """Residue pairs joined by an SG–SG bond of the Topology, as indices into the protein's residues.

    Parameters
    ----------
    topology : openmm.app.Topology
        With bonds (PDBFile/PDBFixer/Modeller add disulfide bonds from CONECT/SSBOND or geometry).
    topology_residue_index : array of int, shape (N,)
        :attr:`ProteinInput.topology_residue_index`.

    Returns
    -------
    np.ndarray of int64, shape (P, 2), each row (i, j) with i < j; pairs with a residue outside the
    protein are left out.
    """
    where = {int(t): i for i, t in enumerate(np.asarray(topology_residue_index).tolist())}
    pairs = set()
    for a, b in topology.bonds():
        if a.name == "SG" and b.name == "SG" and a.residue.index != b.residue.index:
            i, j = where.get(a.residue.index), where.get(b.residue.index)
            if i is not None and j is not None:
                pairs.add((min(i, j), max(i, j)))
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def disulfide_bounds(topology, topology_residue_index):
    """``AutoregressiveSampler(pair_bounds=...)`` for the Topology's disulfides: (pairs (P, 2),
    d_min_nm, d_max_nm) with :data:`DISULFIDE_CA_RANGE_NM`, or None when there are none."""
    pairs = disulfide_pairs(topology, topology_residue_index)
    return (pairs, *DISULFIDE_CA_RANGE_NM) if len(pairs) else None
