#!/usr/bin/env python
"""Build the pooled dihedral library the all-atom checks judge (φ, ψ) and χ against.

Writes ``openmm_starmd/data/dihedral_reference.npz``: raw counts of (φ, ψ) per Ramachandran
class (GENERAL, GLY, PRO, PREPRO; 36×36 bins of 10°) and of (χ1, χ2) per residue type (χ1 alone,
36 bins, for Cys, Ser, Thr and Val), on exactly the grid of
``openmm_starmd.analysis.stereochemistry.periodic_histogram``, plus a JSON ``provenance`` string
(every input file with its sha256, what was excluded and why, counts per class, bins, date).
No pickles: it loads with ``np.load(path, allow_pickle=False)``. Smoothing and the 1% outlier
thresholds are applied when the package loads it (``bundled_dihedral_reference``), so they stay
parameters.

Inputs (all from this checkout):

- the structures of ``training/structures/structures.json`` (first model of each file; for
  alternate locations, mdtraj's reader keeps the first), by default only the experimental ones
  (``--categories natural natural-mutant``; the Rosetta design models are left out unless
  asked for). Every protein whose split in ``training/plan.json`` is "test" or "validation" is
  left out, with every structure whose name contains a held-out name, every member of a
  held-out protein's family named in the plan's notes (:data:`HELD_OUT_FAMILIES`), and every
  structure whose sequence is more than ``--identity`` similar (difflib ratio) to a held-out
  one, so test proteins are never judged by a library built on them.
- finished all-atom MD runs (``<md-root>/<protein>/r<k>/`` with a ``done`` marker, DCD +
  ``topology.pdb``) of training-split proteins, every ``--md-stride``-th frame up to the last
  checkpoint (skip with ``--no-md``). These exist only on the machine that ran them; which
  files and frames went in is recorded.

Per residue: (φ, ψ) needs both angles and no chain break (C(i)–N(i+1) > 0.2 nm, missing
residues) on either side; χ needs every heavy side-chain atom of the residue type (truncated
or non-standard side chains, e.g. selenomethionine, are skipped). Angles come from mdtraj
(``compute_phi/psi/chi1/chi2``) through the package's ``backbone_dihedrals`` and
``sidechain_dihedrals``. Output is deterministic for given inputs (sorted order, no sampling)
apart from the ``built`` date, which ``--date`` can pin.

Run from the repository root:  python training/build_dihedral_reference.py
"""
from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import io
import json
import os
import sys

import mdtraj as md
import numpy as np
from tqdm import tqdm

from openmm_starmd.analysis.inputs import canonical_residue_name
from openmm_starmd.data import sha256_file
from openmm_starmd.analysis.stereochemistry import (PEPTIDE_GAP_NM, RAMACHANDRAN_CLASSES,
                                                    ROTAMER_DIMENSIONS, backbone_dihedrals,
                                                    peptide_bond_atoms, peptide_bond_lengths,
                                                    periodic_histogram, ramachandran_classes,
                                                    sidechain_dihedrals)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(ROOT, "openmm_starmd", "data", "dihedral_reference.npz")
FORMAT = "openmm_starmd dihedral library 1"

#: Families of held-out proteins as listed in training/plan.json's "_doc" notes: the WW domains
#: of the test protein 2M9I and the GA domain 2JWS of the validation protein 1GJS.
HELD_OUT_FAMILIES = {
    "2M9I": ("2KCF", "1I6C", "2M8I", "2M8J", "2YSF", "2OP7", "2YSB", "5AHT"),
    "1GJS": ("2JWS",),
}

#: Heavy side-chain atoms a residue must have for its χ to be counted.
SIDECHAIN_HEAVY = {
    "ARG": ("CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"),
    "ASN": ("CB", "CG", "OD1", "ND2"),
    "ASP": ("CB", "CG", "OD1", "OD2"),
    "CYS": ("CB", "SG"),
    "GLN": ("CB", "CG", "CD", "OE1", "NE2"),
    "GLU": ("CB", "CG", "CD", "OE1", "OE2"),
    "HIS": ("CB", "CG", "ND1", "CD2", "CE1", "NE2"),
    "ILE": ("CB", "CG1", "CG2", "CD1"),
    "LEU": ("CB", "CG", "CD1", "CD2"),
    "LYS": ("CB", "CG", "CD", "CE", "NZ"),
    "MET": ("CB", "CG", "SD", "CE"),
    "PHE": ("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"),
    "PRO": ("CB", "CG", "CD"),
    "SER": ("CB", "OG"),
    "THR": ("CB", "OG1", "CG2"),
    "TRP": ("CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"),
    "TYR": ("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"),
    "VAL": ("CB", "CG1", "CG2"),
}




def relpath(path: str) -> str:
    """Path relative to the repository root (as recorded in the provenance)."""
    return os.path.relpath(os.path.abspath(path), ROOT)


def sequence(traj: md.Trajectory) -> str:
    """One-letter sequence of the Cα-bearing protein residues ('X' for unknown)."""
    return "".join((r.code or "X") for r in traj.topology.residues
                   if r.is_protein and any(a.name == "CA" for a in r.atoms))


def dihedral_samples(traj: md.Trajectory) -> tuple[dict, dict, dict]:
    """Library samples of every frame of ``traj``.

    Parameters
    ----------
    traj : mdtraj.Trajectory
        Protein structure(s) or MD frames (heavy atoms needed; hydrogens ignored).

    Returns
    -------
    rama : dict of str -> np.ndarray, shape=(n, 2), radians
        (φ, ψ) per Ramachandran class, residues at chain breaks left out.
    rotamer : dict of str -> np.ndarray, shape=(n, dims), radians
        (χ1, χ2) or χ1 per residue type, residues with missing side-chain atoms left out.
    skipped : dict of str -> int
        Residue-frames left out: ``"chain_break"`` (φ or ψ across a gap) and
        ``"incomplete_side_chain"``.
    """
    top = traj.topology
    residues = [a.residue for a in top.atoms if a.name == "CA" and a.residue.is_protein]
    phi, psi = backbone_dihedrals(traj)
    _, pos = peptide_bond_atoms(top)
    broken = pos[(peptide_bond_lengths(traj) > PEPTIDE_GAP_NM).any(axis=0)]
    n_break = int(np.isfinite(phi[:, broken + 1]).sum() + np.isfinite(psi[:, broken]).sum())
    phi[:, broken + 1] = np.nan
    psi[:, broken] = np.nan
    classes = np.array(ramachandran_classes(top))
    ok = np.isfinite(phi) & np.isfinite(psi)
    rama = {}
    for cls in RAMACHANDRAN_CLASSES:
        cols = classes == cls
        sel = ok & cols[None, :]
        rama[cls] = np.stack([phi[sel], psi[sel]], axis=-1)

    chi1, chi2 = sidechain_dihedrals(traj)
    names = [canonical_residue_name(r.name) for r in residues]
    rotamer, n_incomplete = {}, 0
    for k, (res, name) in enumerate(zip(residues, names)):
        dims = ROTAMER_DIMENSIONS.get(name)
        if dims is None:
            continue
        present = {a.name for a in res.atoms}
        angles = chi1[:, [k]] if dims == 1 else np.stack([chi1[:, k], chi2[:, k]], axis=-1)
        if not set(SIDECHAIN_HEAVY[name]) <= present or not np.isfinite(angles).all():
            n_incomplete += traj.n_frames
            continue
        rotamer.setdefault(name, []).append(angles)
    rotamer = {n: np.concatenate(v) for n, v in rotamer.items()}
    return rama, rotamer, {"chain_break": n_break, "incomplete_side_chain": n_incomplete}


class Library:
    """Running raw counts per Ramachandran class and per residue type."""

    def __init__(self, bins: int):
        self.bins = bins
        self.rama = {c: np.zeros((bins, bins), dtype=np.int64) for c in RAMACHANDRAN_CLASSES}
        self.rotamer = {n: np.zeros((bins,) * d, dtype=np.int64)
                        for n, d in sorted(ROTAMER_DIMENSIONS.items())}

    def add(self, rama: dict, rotamer: dict) -> dict:
        """Add samples from :func:`dihedral_samples`; returns the counts added per key."""
        added = {}
        for cls, ang in rama.items():
            if len(ang):
                self.rama[cls] += periodic_histogram(ang, self.bins)
            added[f"rama_{cls}"] = len(ang)
        for name, ang in rotamer.items():
            self.rotamer[name] += periodic_histogram(ang, self.bins)
            added[f"rotamer_{name}"] = len(ang)
        return added

    def arrays(self) -> dict:
        """The npz arrays: ``rama_<CLASS>`` and ``rotamer_<RES>`` as int32 counts."""
        out = {f"rama_{c}": v.astype(np.int32) for c, v in self.rama.items()}
        out.update({f"rotamer_{n}": v.astype(np.int32) for n, v in self.rotamer.items()})
        return out

    def totals(self) -> dict:
        """Samples per class and per residue type."""
        return {"rama": {c: int(v.sum()) for c, v in self.rama.items()},
                "rotamer": {n: int(v.sum()) for n, v in self.rotamer.items()}}


def held_out_proteins(plan: dict) -> dict:
    """Name -> split of every plan protein whose split is test or validation."""
    return {n: p.get("split", "train") for n, p in sorted(plan.get("proteins", {}).items())
            if p.get("split", "train") in ("test", "validation")}


def load_first_model(path: str) -> md.Trajectory:
    """First model of a structure file, as a one-frame trajectory."""
    return md.load(path)[0]


def exclusion_reason(name: str, seq: str, held_out: dict, held_seqs: dict,
                     identity: float, extra: set) -> str | None:
    """Why a structure must stay out of the library, or None."""
    if name in extra:
        return "excluded on the command line (--exclude)"
    if name in held_out:
        return f"{held_out[name]}-split protein in training/plan.json"
    for h in held_out:
        if h.lower() in name.lower():
            return f"name contains the {held_out[h]} protein {h}"
        if name in HELD_OUT_FAMILIES.get(h, ()):
            return f"family of the {held_out[h]} protein {h} (training/plan.json notes)"
    for h, hseq in held_seqs.items():
        if seq and hseq:
            ratio = difflib.SequenceMatcher(None, seq, hseq, autojunk=False).ratio()
            if ratio > identity:
                return f"sequence similarity {ratio:.2f} > {identity} to the {held_out[h]} protein {h}"
    return None


def add_structures(lib: Library, args, held_out: dict, plan: dict) -> dict:
    """Pool the chosen structures of structures.json; returns their provenance records."""
    with open(args.structures) as fh:
        listing = json.load(fh)
    folder = os.path.dirname(os.path.abspath(args.structures))
    held_seqs, unreadable = {}, []
    for name in held_out:
        entry = plan["proteins"][name]
        path = os.path.join(HERE, entry["file"])
        try:
            held_seqs[name] = sequence(load_first_model(path))
        except Exception as exc:  # noqa: BLE001 - an unreadable held-out file must be reported
            raise SystemExit(f"cannot read held-out structure {path} ({exc}); the family check "
                             "needs its sequence, fix the path in training/plan.json.") from exc
    used, excluded = [], []
    entries = sorted(listing["structures"], key=lambda e: e["name"])
    for entry in tqdm(entries, desc="structures", unit="file"):
        name, path = entry["name"], os.path.join(folder, entry["file"])
        if entry.get("category") not in args.categories:
            excluded.append({"name": name, "reason": f"category {entry.get('category')!r} not in "
                                                     f"--categories {args.categories}"})
            continue
        try:
            traj = load_first_model(path)
        except Exception as exc:  # noqa: BLE001 - skip any unreadable file, with its reason
            unreadable.append({"name": name, "file": relpath(path),
                               "reason": f"{type(exc).__name__}: {exc}"})
            tqdm.write(f"skip {name}: cannot read {path} ({type(exc).__name__}: {exc})")
            continue
        reason = exclusion_reason(name, sequence(traj), held_out, held_seqs, args.identity,
                                  set(args.exclude))
        if reason:
            excluded.append({"name": name, "reason": reason})
            continue
        rama, rotamer, skipped = dihedral_samples(traj)
        added = lib.add(rama, rotamer)
        sha = sha256_file(path)
        used.append({"name": name, "file": relpath(path), "sha256": sha,
                     "sha256_matches_structures_json": sha == entry.get("sha256"),
                     "category": entry.get("category"), "n_residues": len(sequence(traj)),
                     "n_rama": sum(v for k, v in added.items() if k.startswith("rama_")),
                     "n_rotamer": sum(v for k, v in added.items() if k.startswith("rotamer_")),
                     "skipped": skipped})
    return {"structures": used, "excluded": excluded, "unreadable": unreadable}


def add_md_runs(lib: Library, args, plan: dict, excluded_names: set) -> dict:
    """Pool subsampled frames of finished MD runs of training-split proteins."""
    runs, skipped = [], []
    if args.no_md or not os.path.isdir(args.md_root):
        return {"md_runs": runs, "md_skipped": skipped}
    splits = {n: p.get("split", "train") for n, p in plan.get("proteins", {}).items()}
    for protein in sorted(os.listdir(args.md_root)):
        pdir = os.path.join(args.md_root, protein)
        if not os.path.isdir(pdir):
            continue
        for rep in sorted(d for d in os.listdir(pdir) if d[:1] == "r" and d[1:].isdigit()):
            rdir = os.path.join(pdir, rep)
            where = relpath(rdir)
            if splits.get(protein) != "train" or protein in excluded_names:
                skipped.append({"run": where, "reason": f"split {splits.get(protein)!r}, not train"})
                continue
            if not os.path.exists(os.path.join(rdir, "done")):
                skipped.append({"run": where, "reason": "not finished (no done marker)"})
                continue
            dcd, top = os.path.join(rdir, "traj.dcd"), os.path.join(rdir, "topology.pdb")
            try:
                with open(os.path.join(rdir, "checkpoint.json")) as fh:
                    n_frames = int(json.load(fh)["frames"])
                dcd_sha, top_sha = sha256_file(dcd), sha256_file(top)
                traj = md.load(dcd, top=top)[:n_frames:args.md_stride]
            except Exception as exc:  # noqa: BLE001 - skip any unreadable run, with its reason
                skipped.append({"run": where, "reason": f"{type(exc).__name__}: {exc}"})
                tqdm.write(f"skip {where}: {type(exc).__name__}: {exc}")
                continue
            rama, rotamer, skip = dihedral_samples(traj)
            added = lib.add(rama, rotamer)
            runs.append({"protein": protein, "replica": int(rep[1:]), "dcd": relpath(dcd),
                         "dcd_sha256": dcd_sha, "topology": relpath(top),
                         "topology_sha256": top_sha, "n_frames_checkpointed": n_frames,
                         "frames": f"0:{n_frames}:{args.md_stride}",
                         "n_frames_used": traj.n_frames,
                         "n_rama": sum(v for k, v in added.items() if k.startswith("rama_")),
                         "n_rotamer": sum(v for k, v in added.items() if k.startswith("rotamer_")),
                         "skipped": skip})
    return {"md_runs": runs, "md_skipped": skipped}


def build(args) -> dict:
    """Pool everything and write the npz; returns the provenance record."""
    with open(args.plan) as fh:
        plan = json.load(fh)
    held_out = held_out_proteins(plan)
    lib = Library(args.bins)
    record = add_structures(lib, args, held_out, plan)
    record.update(add_md_runs(lib, args, plan, {e["name"] for e in record["excluded"]}))
    provenance = {
        "format": FORMAT,
        "built": args.date or _dt.date.today().isoformat(),
        "script": "training/build_dihedral_reference.py",
        "options": {"categories": list(args.categories), "identity": args.identity,
                    "exclude": list(args.exclude), "md": not args.no_md,
                    "md_stride": args.md_stride, "bins": args.bins},
        "bins": args.bins,
        "angle_range": "[-pi, pi) radians, bin k covers [-pi + k*w, -pi + (k+1)*w), w = 2 pi / bins",
        "angles": "mdtraj compute_phi/compute_psi/compute_chi1/compute_chi2 atom definitions",
        "arrays": "rama_<CLASS>: (bins, bins) counts over (phi, psi); rotamer_<RES>: (bins, bins) "
                  "over (chi1, chi2) or (bins,) over chi1; raw counts, unsmoothed, chi2 not "
                  "symmetrised (done at load)",
        "rotamer_dimensions": dict(sorted(ROTAMER_DIMENSIONS.items())),
        "held_out": held_out,
        "held_out_families": {k: list(v) for k, v in HELD_OUT_FAMILIES.items()},
        "plan": relpath(args.plan), "plan_sha256": sha256_file(args.plan),
        "structures_json": relpath(args.structures),
        "structures_json_sha256": sha256_file(args.structures),
        "versions": {"mdtraj": md.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "counts": lib.totals(),
        **record,
    }
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, bins=np.int64(args.bins),
                        provenance=np.array(json.dumps(provenance, indent=1, sort_keys=True)),
                        **lib.arrays())
    with open(out, "wb") as fh:
        fh.write(buf.getvalue())
    return provenance


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="npz file to write")
    p.add_argument("--structures", default=os.path.join(HERE, "structures", "structures.json"),
                   help="structure listing (fetch_structures.py); files are read beside it")
    p.add_argument("--plan", default=os.path.join(HERE, "plan.json"),
                   help="MD plan whose test and validation proteins (and families) are left out")
    p.add_argument("--categories", nargs="+", default=["natural", "natural-mutant"],
                   help="structures.json categories to pool (add 'designed' for the Rosetta "
                        "design models)")
    p.add_argument("--identity", type=float, default=0.6,
                   help="leave out structures whose difflib sequence similarity to a held-out "
                        "protein exceeds this (the plan's family criterion)")
    p.add_argument("--exclude", nargs="*", default=[], help="further structure names to leave out")
    p.add_argument("--md-root", default=os.path.join(HERE, "md"),
                   help="root of simulate.py runs (<protein>/r<k>/traj.dcd + topology.pdb)")
    p.add_argument("--md-stride", type=int, default=5,
                   help="use every n-th checkpointed frame of each finished training-split run")
    p.add_argument("--no-md", action="store_true", help="pool the structures only")
    p.add_argument("--bins", type=int, default=36,
                   help="bins per angle over [-pi, pi); the package's densities use 36")
    p.add_argument("--date", default=None, help="'built' date to record (default: today)")
    args = p.parse_args(argv)
    if args.md_stride < 1:
        p.error("--md-stride must be at least 1")
    if args.bins < 2 or args.bins % 2:
        p.error("--bins must be an even number >= 2 (the 180° chi2 symmetry shifts by bins/2)")
    prov = build(args)
    c = prov["counts"]
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes): "
          f"{len(prov['structures'])} structures, {len(prov['md_runs'])} MD runs "
          f"({sum(r['n_frames_used'] for r in prov['md_runs'])} frames); "
          f"{len(prov['excluded'])} excluded, {len(prov['unreadable'])} unreadable")
    print("rama samples: " + ", ".join(f"{k} {v}" for k, v in c["rama"].items()))
    print("rotamer samples: " + ", ".join(f"{k} {v}" for k, v in c["rotamer"].items()))
    for e in prov["excluded"]:
        if not e["reason"].startswith("category"):
            print(f"  excluded {e['name']}: {e['reason']}")
    for r in prov["md_skipped"]:
        print(f"  MD skipped {r['run']}: {r['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
