"""``starmd evaluate`` / ``evaluate-many`` through argparse on real DCD files."""

import argparse
import json
import os

import mdtraj as md
import pytest

from openmm_starmd.analysis.report import PLOT_FILES
from openmm_starmd.cli_evaluate import add_evaluate_parser


def _run(argv):
    parser = argparse.ArgumentParser(prog="starmd")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_command_writes_report(md_files, tmp_path, capsys):
    out = tmp_path / "report"
    energies = tmp_path / "e.txt"
    energies.write_text("\n".join(map(str, md_files["replica2_energies"])))
    ref_energies = tmp_path / "e_ref.txt"
    ref_energies.write_text("\n".join(map(str, md_files["replica1_energies"])))
    code = _run(["evaluate", "--reference", md_files["replica1"], "--top", md_files["top"],
                 "--generated", md_files["replica2"], "--dt-ns", str(md_files["dt_ns"]),
                 "--energies", str(energies), "--reference-energies", str(ref_energies),
                 "--out", str(out)])
    assert code == 0
    assert sorted(os.listdir(out)) == sorted(("metrics.json",) + PLOT_FILES)
    data = json.loads((out / "metrics.json").read_text())
    assert data["inputs"]["generated"].endswith("replica2.dcd'")
    assert data["validity"]["energy_validity"] is not None
    assert "pca_jsd" in capsys.readouterr().out


def test_atom_count_mismatch_names_file_and_fix(md_files, tmp_path, capsys):
    ca_top = tmp_path / "ca.pdb"
    full = md.load(md_files["top"])
    full.atom_slice(full.topology.select("name CA")).save(str(ca_top))
    out = tmp_path / "report"
    code = _run(["evaluate", "--reference", md_files["replica1"], "--top", md_files["top"],
                 "--generated", md_files["replica2"], "--gen-top", str(ca_top),
                 "--dt-ns", "0.001", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "replica2.dcd" in err and f"has {full.n_atoms} atoms" in err and "ca.pdb" in err
    assert "pass the topology the trajectory was written with" in err


def test_dcd_without_dt_asks_for_it(md_files, tmp_path, capsys):
    code = _run(["evaluate", "--reference", md_files["replica1"], "--top", md_files["top"],
                 "--generated", md_files["replica2"], "--out", str(tmp_path / "r")])
    assert code == 2 and "--dt-ns" in capsys.readouterr().err


def test_evaluate_many_command(md_files, tmp_path, capsys):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"name": "p", "reference": md_files["replica1"],
                                     "top": md_files["top"], "generated": md_files["replica2"],
                                     "dt_ns": md_files["dt_ns"]}]))
    code = _run(["evaluate-many", str(manifest), "--out", str(tmp_path / "t"), "--no-baselines"])
    assert code == 0
    assert (tmp_path / "t" / "table.md").read_text().count("| model | 1 |") == 1
    assert "MD oracle" not in capsys.readouterr().out


@pytest.mark.parametrize("argv_tail", [["--tica-lag-ns", "1.0"]])
def test_too_short_for_lag_is_an_error(md_files, tmp_path, capsys, argv_tail):
    code = _run(["evaluate", "--reference", md_files["replica1"], "--top", md_files["top"],
                 "--generated", md_files["replica2"], "--dt-ns", str(md_files["dt_ns"]),
                 "--out", str(tmp_path / "r")] + argv_tail)
    err = capsys.readouterr().err
    assert code == 2 and "too few" in err and "--tica-lag-ns" in err
    assert not (tmp_path / "r").exists()
