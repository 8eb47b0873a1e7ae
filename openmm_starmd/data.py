"""Backbone shards: the training-data format of STAR-MD, and readers for MD trajectories.

STAR-MD models each residue as a rigid frame built from its backbone N, CA, C atoms (O is kept
for the backmapping and for ATLAS-style metrics), so the training data are backbone
trajectories. A *shard* is one ``.npz`` per (protein, replica), readable with
``np.load(path, allow_pickle=False)``:

==================  ==========================  =============================================
key                 dtype / shape               meaning
==================  ==========================  =============================================
``coords_nm``       float32 (F, N, 4, 3)        N, CA, C, O of every residue, nm
``time_ns``         float64 (F,)                time of each frame, ns
``frame_spacing_ns`` float64 ()                 spacing between consecutive frames, ns
``sequence``        str ()                      one-letter sequence, ``X`` for unknown
``aatype``          int8 (N,)                   AlphaFold order ``ARNDCQEGHILKMFPSTWYV``, 20 = X
``residue_index``   int32 (N,)                  author residue numbers
``chain_index``     int32 (N,)                  0, 1, ... per chain in file order
``chain_ids``       str (n_chains,)             chain ids
``residue_mask``    bool (N,)                   all four backbone atoms present
``temperature_k``   float64 ()                  simulation temperature, K
``forcefield``      str ()                      force field description
``name``            str ()                      protein name
``replica``         int32 ()                    replica number
``provenance``      str ()                      JSON: source files, settings, sha256s
``format_version``  int32 ()                    :data:`FORMAT_VERSION`
==================  ==========================  =============================================

Choices the paper leaves open:

- Missing backbone atoms (masked residues) have zero coordinates; readers keep every protein
  residue so residue indices stay aligned with the topology.
- A shard is written to ``<path>.tmp.npz`` and renamed, so a crash never leaves a partial shard
  under the final name; :func:`load_shard` verifies a sha256 when one is given (the manifest of
  ``training/prepare.py`` records it).
- Frame times come from the trajectory when the format stores them (XTC, TRR, NetCDF, HDF5);
  DCD stores none, so the spacing must be passed.
- The ATLAS layout (``<name>.pdb`` + ``<name>_prod_R{1,2,3}_fit.xtc``, 10 ps frames, 300 K,
  CHARMM36m/TIP3P) is read by :func:`read_atlas`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "FORMAT_VERSION", "RESTYPES", "BACKBONE_ATOMS", "TrajectoryError", "BackboneShard",
    "save_shard", "load_shard", "read_backbone_trajectory", "read_atlas", "sha256_file", "backbone_trajectory",
]

FORMAT_VERSION = 1
RESTYPES = "ARNDCQEGHILKMFPSTWYV"
BACKBONE_ATOMS = ("N", "CA", "C", "O")
_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G",
    "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S",
    "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V",
    # protonation/force-field aliases found in MD topologies
    "HID": "H", "HIE": "H", "HIP": "H", "HSD": "H", "HSE": "H", "HSP": "H", "CYX": "C", "CYM": "C",
    "ASH": "D", "GLH": "E", "LYN": "K",
}
_O_ALIASES = ("O", "OT1", "O1", "OC1")
_TIMED_FORMATS = (".xtc", ".trr", ".nc", ".ncdf", ".netcdf", ".h5", ".lh5")


class TrajectoryError(ValueError):
    """Bad trajectory input; the message names the file, the problem and the fix."""


@dataclass
class BackboneShard:
    """One backbone trajectory. Shapes: F frames, N residues.

    Attributes
    ----------
    coords_nm : np.ndarray, shape=(F, N, 4, 3), float32, nm
    frame_spacing_ns : float
    sequence : str, length N
    residue_index : np.ndarray, shape=(N,), int32
    chain_index : np.ndarray, shape=(N,), int32
    chain_ids : list[str]
    residue_mask : np.ndarray, shape=(N,), bool
    time_ns : np.ndarray, shape=(F,), float64; defaults to ``arange(1, F + 1) * spacing``
    temperature_k, forcefield, name, replica, provenance (dict, JSON-serialisable)
    """

    coords_nm: np.ndarray
    frame_spacing_ns: float
    sequence: str
    residue_index: np.ndarray
    chain_index: np.ndarray
    chain_ids: list
    residue_mask: np.ndarray
    time_ns: Optional[np.ndarray] = None
    temperature_k: float = 300.0
    forcefield: str = "unknown"
    name: str = "protein"
    replica: int = 0
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.coords_nm = np.asarray(self.coords_nm, dtype=np.float32)
        f = self.coords_nm.shape[0] if self.coords_nm.ndim == 4 else -1
        if self.time_ns is None and f >= 0:
            self.time_ns = np.arange(1, f + 1, dtype=np.float64) * float(self.frame_spacing_ns)
        self.residue_index = np.asarray(self.residue_index, dtype=np.int32)
        self.chain_index = np.asarray(self.chain_index, dtype=np.int32)
        self.residue_mask = np.asarray(self.residue_mask, dtype=bool)
        self.time_ns = np.asarray(self.time_ns, dtype=np.float64)
        self.chain_ids = [str(c) for c in self.chain_ids]
        self.validate()

    @property
    def n_frames(self) -> int:
        return int(self.coords_nm.shape[0])

    @property
    def n_residues(self) -> int:
        return int(self.coords_nm.shape[1])

    @property
    def aatype(self) -> np.ndarray:
        """(N,) int8 residue types in :data:`RESTYPES` order, 20 for unknown."""
        return np.array([RESTYPES.index(c) if c in RESTYPES else 20 for c in self.sequence], dtype=np.int8)

    @property
    def total_ns(self) -> float:
        return self.n_frames * float(self.frame_spacing_ns)

    def validate(self) -> None:
        """Check shapes, finiteness and consistency; raise :class:`TrajectoryError` if broken."""
        c = self.coords_nm
        where = f"shard {self.name!r} r{self.replica}"
        if c.ndim != 4 or c.shape[2:] != (4, 3):
            raise TrajectoryError(f"{where}: coords_nm has shape {c.shape}, expected (frames, residues, 4, 3).")
        if c.shape[0] == 0:
            raise TrajectoryError(f"{where}: has no frames; simulate longer or check the trajectory file.")
        n = c.shape[1]
        for key, arr in (("residue_index", self.residue_index), ("chain_index", self.chain_index),
                         ("residue_mask", self.residue_mask)):
            if arr.shape != (n,):
                raise TrajectoryError(f"{where}: {key} has shape {arr.shape}, expected ({n},) to match coords_nm.")
        if len(self.sequence) != n:
            raise TrajectoryError(f"{where}: sequence has {len(self.sequence)} letters for {n} residues.")
        if self.time_ns.shape != (c.shape[0],):
            raise TrajectoryError(f"{where}: time_ns has shape {self.time_ns.shape}, expected ({c.shape[0]},).")
        if not (self.frame_spacing_ns > 0):
            raise TrajectoryError(f"{where}: frame_spacing_ns={self.frame_spacing_ns} must be positive.")
        if not np.all(np.isfinite(c)):
            bad = np.argwhere(~np.isfinite(c).all(axis=(1, 2, 3)))[:, 0]
            raise TrajectoryError(f"{where}: NaN/inf coordinates in frames {bad[:5].tolist()}...; "
                                  "drop those frames or regenerate the trajectory.")


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_shard(path: str, shard: BackboneShard) -> str:
    """Write ``shard`` to ``path`` (``.npz``) atomically; return the file's sha256."""
    shard.validate()
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise TrajectoryError(f"{path}: shard paths must end in .npz; rename it.")
    tmp = path[:-4] + ".tmp.npz"
    arrays = dict(
        coords_nm=shard.coords_nm.astype(np.float32),
        time_ns=shard.time_ns.astype(np.float64),
        frame_spacing_ns=np.float64(shard.frame_spacing_ns),
        sequence=np.array(shard.sequence),
        aatype=shard.aatype,
        residue_index=shard.residue_index,
        chain_index=shard.chain_index,
        chain_ids=np.array(shard.chain_ids, dtype=str),
        residue_mask=shard.residue_mask,
        temperature_k=np.float64(shard.temperature_k),
        forcefield=np.array(shard.forcefield),
        name=np.array(shard.name),
        replica=np.int32(shard.replica),
        provenance=np.array(json.dumps(shard.provenance, sort_keys=True)),
        format_version=np.int32(FORMAT_VERSION),
    )
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sha256_file(path)


def load_shard(path: str, sha256: Optional[str] = None) -> BackboneShard:
    """Read a shard written by :func:`save_shard`; check its sha256 when given."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TrajectoryError(f"{path}: shard not found; run training/prepare.py to (re)build shards.")
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256:
            raise TrajectoryError(f"{path}: sha256 {got[:12]}... differs from the manifest's {sha256[:12]}...; "
                                  "rebuild it with training/prepare.py.")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as exc:
        raise TrajectoryError(f"{path}: not a readable shard ({exc}); rebuild it with training/prepare.py.") from exc
    version = int(d.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise TrajectoryError(f"{path}: shard format {version}, this code reads {FORMAT_VERSION}; rebuild it.")
    return BackboneShard(
        coords_nm=d["coords_nm"], frame_spacing_ns=float(d["frame_spacing_ns"]), sequence=str(d["sequence"]),
        residue_index=d["residue_index"], chain_index=d["chain_index"], chain_ids=[str(c) for c in d["chain_ids"]],
        residue_mask=d["residue_mask"], time_ns=d["time_ns"], temperature_k=float(d["temperature_k"]),
        forcefield=str(d["forcefield"]), name=str(d["name"]), replica=int(d["replica"]),
        provenance=json.loads(str(d["provenance"])),
    )


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------

def backbone_trajectory(shard: BackboneShard, frames: Optional[slice] = None):
    """The shard as an mdtraj Trajectory of its backbone atoms (N, CA, C, O per valid residue).

    Residues keep their order, chains and author numbers; masked residues (missing backbone
    atoms) are left out. Times in ps. For the evaluation (:mod:`openmm_starmd.analysis`), whose
    Cα, coverage and dynamics metrics need no more than this.

    Returns
    -------
    mdtraj.Trajectory, ``xyz`` shape (F, 4 n_valid, 3), nm
    """
    import mdtraj as md

    three = {v: k for k, v in reversed(list(_ONE.items()))}  # first (canonical) name per letter
    top = md.Topology()
    chains = {}
    keep = np.flatnonzero(shard.residue_mask)
    for i in keep:
        c = int(shard.chain_index[i])
        if c not in chains:
            chains[c] = top.add_chain()
        res = top.add_residue(three.get(shard.sequence[i], "UNK"), chains[c], resSeq=int(shard.residue_index[i]))
        atoms = [top.add_atom(name, md.element.get_by_symbol(name[0]), res) for name in BACKBONE_ATOMS]
        top.add_bond(atoms[0], atoms[1])
        top.add_bond(atoms[1], atoms[2])
        top.add_bond(atoms[2], atoms[3])
    sel = slice(None) if frames is None else frames
    xyz = shard.coords_nm[sel][:, keep].reshape(-1, 4 * len(keep), 3)
    return md.Trajectory(xyz, top, time=shard.time_ns[sel] * 1000.0)


def _backbone_layout(topology, source: str):
    """Per protein residue: atom indices of N, CA, C, O (-1 if missing), plus sequence/chain info."""
    residues = [r for r in topology.residues if r.is_protein or r.name in _ONE]
    if not residues:
        raise TrajectoryError(f"{source}: topology has no protein residues; pass the protein's topology file.")
    idx = np.full((len(residues), 4), -1, dtype=np.int64)
    seq, resid, chain_of, chain_ids, chain_map = [], [], [], [], {}
    for i, res in enumerate(residues):
        names = {a.name: a.index for a in res.atoms}
        for j, atom in enumerate(BACKBONE_ATOMS):
            cands = _O_ALIASES if atom == "O" else (atom,)
            idx[i, j] = next((names[c] for c in cands if c in names), -1)
        seq.append(_ONE.get(res.name, "X"))
        resid.append(res.resSeq)
        key = res.chain.index
        if key not in chain_map:
            chain_map[key] = len(chain_map)
            cid = getattr(res.chain, "chain_id", None)
            chain_ids.append(str(cid) if cid not in (None, "") else chr(ord("A") + len(chain_ids) % 26))
        chain_of.append(chain_map[key])
    return idx, "".join(seq), np.array(resid), np.array(chain_of), chain_ids


def _first_frame_atoms(path: str) -> int:
    """Number of atoms per frame stored in a trajectory file, without a topology."""
    import mdtraj as md

    with md.open(path) as f:
        out = f.read(n_frames=1)
    xyz = out.coordinates if hasattr(out, "coordinates") else out[0]
    if xyz is None or len(xyz) == 0:
        raise TrajectoryError(f"{path}: trajectory has no frames; simulate longer or pass a non-empty file.")
    return int(np.asarray(xyz).shape[1])


def read_backbone_trajectory(
    traj_path: str,
    top_path: Optional[str] = None,
    frame_spacing_ns: Optional[float] = None,
    n_frames: Optional[int] = None,
    stride: int = 1,
    name: Optional[str] = None,
    replica: int = 0,
    temperature_k: float = 300.0,
    forcefield: str = "unknown",
    provenance: Optional[dict] = None,
) -> BackboneShard:
    """Read the backbone of a trajectory in any mdtraj format into a :class:`BackboneShard`.

    Parameters
    ----------
    traj_path : str
        DCD, XTC, TRR, NetCDF (.nc), HDF5 (.h5), ... anything ``mdtraj.load`` reads.
    top_path : str, optional
        Topology (PDB, ...); optional for HDF5, which embeds it.
    frame_spacing_ns : float, optional
        Time between saved frames before striding, ns. Required for formats without times (DCD).
    n_frames : int, optional
        Read only the first ``n_frames`` frames (e.g. the checkpointed part of a growing DCD).
    stride : int
        Keep every ``stride``-th frame; the shard's spacing is ``stride * frame_spacing_ns``.

    Raises
    ------
    TrajectoryError
        Missing/unreadable/empty file, atom-count mismatch with the topology, no protein
        residues, fewer frames than ``n_frames``, NaN coordinates, unknown frame spacing.
    """
    import mdtraj as md

    for p in (traj_path, top_path):
        if p is not None and not os.path.exists(p):
            raise TrajectoryError(f"{p}: file not found; check the path.")
    if os.path.getsize(traj_path) == 0:
        raise TrajectoryError(f"{traj_path}: file is empty; regenerate the trajectory.")
    if os.path.splitext(traj_path)[1].lower() in (".h5", ".lh5"):
        import importlib.util

        if importlib.util.find_spec("tables") is None:
            raise TrajectoryError(f"{traj_path}: reading HDF5 needs PyTables; `pip install tables` "
                                  "or convert the trajectory to DCD/XTC.")
    try:
        top = md.load_topology(top_path if top_path is not None else traj_path)
    except Exception as exc:
        raise TrajectoryError(f"{top_path or traj_path}: cannot read a topology ({exc}); pass a PDB topology with top_path.") from exc
    try:
        n_file_atoms = _first_frame_atoms(traj_path)
    except TrajectoryError:
        raise
    except Exception as exc:
        raise TrajectoryError(f"{traj_path}: unreadable trajectory ({type(exc).__name__}: {exc}); "
                              "check the file format/extension or regenerate it.") from exc
    if n_file_atoms != top.n_atoms:
        raise TrajectoryError(f"{traj_path}: has {n_file_atoms} atoms per frame but topology {top_path} has "
                              f"{top.n_atoms}; pass the topology the trajectory was written with.")
    idx, seq, resid, chain_of, chain_ids = _backbone_layout(top, top_path or traj_path)
    present = idx >= 0
    atom_indices = np.unique(idx[present])
    try:
        if n_frames is not None:
            with md.open(traj_path) as f:
                traj = f.read_as_traj(top, n_frames=n_frames, atom_indices=atom_indices)
            if traj.n_frames < n_frames:
                raise TrajectoryError(f"{traj_path}: has {traj.n_frames} frames, fewer than the {n_frames} "
                                      "requested; pass a smaller n_frames.")
        else:
            traj = md.load(traj_path, top=top, atom_indices=atom_indices)
    except TrajectoryError:
        raise
    except Exception as exc:
        raise TrajectoryError(f"{traj_path}: unreadable trajectory ({type(exc).__name__}: {exc}); "
                              "regenerate it or pass n_frames to read only complete frames.") from exc
    if traj.n_frames == 0:
        raise TrajectoryError(f"{traj_path}: trajectory has no frames; simulate longer or pass a non-empty file.")
    traj = traj[::stride]
    # Map each backbone atom to its column in the sliced trajectory.
    col = np.searchsorted(atom_indices, np.where(present, idx, atom_indices[0]))
    coords = traj.xyz[:, col.reshape(-1)].reshape(traj.n_frames, idx.shape[0], 4, 3)
    coords = np.where(present[None, :, :, None], coords, 0.0).astype(np.float32)

    times_ps = np.asarray(traj.time, dtype=np.float64)
    # mdtraj fills in frame indices as times for formats that store none (DCD, ...).
    has_times = (os.path.splitext(traj_path)[1].lower() in _TIMED_FORMATS and times_ps.size > 1
                 and np.all(np.diff(times_ps) > 0))
    if frame_spacing_ns is not None:
        spacing = float(frame_spacing_ns) * stride
        time_ns = np.arange(1, traj.n_frames + 1) * spacing
    elif has_times:
        spacing = float(np.median(np.diff(times_ps))) / 1000.0
        time_ns = times_ps / 1000.0
    else:
        raise TrajectoryError(f"{traj_path}: the format stores no frame times; pass frame_spacing_ns.")
    shard = BackboneShard(
        coords_nm=coords, frame_spacing_ns=spacing, sequence=seq, residue_index=resid, chain_index=chain_of,
        chain_ids=chain_ids, residue_mask=present.all(axis=1), time_ns=time_ns, temperature_k=temperature_k,
        forcefield=forcefield, name=name or os.path.splitext(os.path.basename(traj_path))[0], replica=replica,
        provenance=dict(provenance or {}, trajectory=os.path.abspath(traj_path),
                        topology=os.path.abspath(top_path) if top_path else None, stride=stride),
    )
    return shard


def read_atlas(directory: str, name: str, replicas: Sequence[int] = (1, 2, 3), stride: int = 1) -> list:
    """Read an ATLAS entry: ``<name>.pdb`` and ``<name>_prod_R{k}_fit.xtc`` for k in ``replicas``.

    ATLAS (Vander Meersche et al. 2024) ships, per chain, a topology PDB and three 100 ns
    replicas with frames every 10 ps, fitted on the backbone, simulated at 300 K with CHARMM36m
    in TIP3P water; frame times come from the XTC files. Returns one shard per replica
    (``replica`` numbered from 0).
    """
    top = os.path.join(directory, f"{name}.pdb")
    if not os.path.exists(top):
        raise TrajectoryError(f"{top}: ATLAS topology not found; pass the folder holding {name}.pdb and its XTC files.")
    shards = []
    for k in replicas:
        xtc = os.path.join(directory, f"{name}_prod_R{k}_fit.xtc")
        if not os.path.exists(xtc):
            raise TrajectoryError(f"{xtc}: ATLAS replica R{k} not found; pass replicas=... with the ones you have.")
        shards.append(read_backbone_trajectory(
            xtc, top, stride=stride, name=name, replica=k - 1, temperature_k=300.0,
            forcefield="CHARMM36m/TIP3P (ATLAS)", provenance={"dataset": "ATLAS", "replica_file": f"R{k}"}))
    return shards
