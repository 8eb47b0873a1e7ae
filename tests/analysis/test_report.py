"""evaluate() and evaluate_many() on two short real MD runs: files, contents, clear failures."""

import json
import os

import mdtraj as md
import numpy as np
import pytest

from openmm_starmd.analysis.baselines import anm_ensemble
from openmm_starmd.analysis.inputs import InputError
from openmm_starmd.analysis.report import PLOT_FILES, SUMMARY_COLUMNS, evaluate, evaluate_many
from openmm_starmd.analysis.stereochemistry import fit_allatom_criteria


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    with open(path) as fh:
        return json.load(fh, parse_constant=refuse)


def _leftovers(folder):
    return [n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n]


@pytest.fixture(scope="module")
def report(md_pair, md_files, tmp_path_factory):
    ref, rep = md_pair
    out = tmp_path_factory.mktemp("reports") / "oracle"
    result = evaluate(ref, rep, md_files["dt_ns"], str(out),
                      energies=md_files["replica2_energies"],
                      reference_energies=md_files["replica1_energies"])
    return out, result


def test_evaluate_writes_json_and_every_plot(report):
    out, result = report
    assert sorted(os.listdir(out)) == sorted(("metrics.json",) + PLOT_FILES)
    for name in PLOT_FILES:
        with open(out / name, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    data = _strict_json(out / "metrics.json")
    assert data == json.loads(json.dumps(result))
    assert set(data["summary"]) == {k for k, _, _ in SUMMARY_COLUMNS}
    assert not _leftovers(out.parent)


def test_md_replica_scores_like_an_oracle(report, md_pair):
    _, r = report
    v, c, d = r["validity"], r["coverage"], r["dynamics"]
    assert v["ca_validity"] == 1.0
    assert r["inputs"]["all_atom_checks"] and r["inputs"]["energy_checks"]
    assert 0.0 <= v["allatom_validity"] <= 1.0
    assert v["n_valid_frames"] == sum(v["per_frame_valid"]) == c["n_frames_used"]
    assert len(c["rmsf_nm"]["reference"]) == md_pair[0].n_residues
    for key in ("pca_jsd", "pca_recall", "tic0_jsd"):
        value = c.get(key, d.get(key))
        assert value is not None and 0.0 <= value <= 1.0
    assert c["pca_w2_nm"] >= 0.0
    # With all-atom thresholds fitted on only 40 reference frames, the replica keeps 1-5 valid frames
    # (run-to-run: OpenMM CPU MD is not bit-reproducible), and a pairwise RMSD needs two of them.
    if v["n_valid_frames"] >= 2:
        assert c["pairwise_rmsd_nm"] > 0.0
    else:
        assert c["pairwise_rmsd_nm"] is None  # NaN, written to JSON as null
    assert d["tica_lag_ns"] == pytest.approx(r["inputs"]["dt_ns"])
    assert len(v["over_time"]["block_start_ns"]) == len(v["over_time"]["combined"])


def test_self_comparison_is_perfect_on_valid_frames(md_pair, md_files):
    ref = md_pair[0]
    r = evaluate(ref, ref, md_files["dt_ns"])
    if r["validity"]["n_valid_frames"] == ref.n_frames:
        s = r["summary"]
        assert s["pca_jsd"] == pytest.approx(0.0, abs=1e-12)
        assert s["pca_recall"] == 1.0 and s["rmsf_pearson_r"] == pytest.approx(1.0)
        assert s["vamp2_deviation"] == pytest.approx(0.0, abs=1e-9)
    # the reference's own all-atom thresholds pass ~99% of its frames on each check
    assert r["validity"]["ramachandran_ok_fraction"] >= 0.97


def test_invalid_frames_are_left_out_of_coverage(md_pair, md_files):
    ref, rep = md_pair
    broken = md.Trajectory(rep.xyz.copy(), rep.topology)
    ca = broken.topology.select("name CA")
    later = np.array([a.index for a in broken.topology.atoms if a.residue.index >= 20])
    bond = broken.xyz[:, ca[20]] - broken.xyz[:, ca[19]]
    shift = 0.3 * bond / np.linalg.norm(bond, axis=-1, keepdims=True)
    bad = np.arange(0, rep.n_frames, 4)
    broken.xyz[bad[:, None], later[None, :]] += shift[bad, None, :]
    r = evaluate(ref, broken, md_files["dt_ns"])
    assert r["validity"]["ca_break_fraction"] == pytest.approx(len(bad) / rep.n_frames)
    assert not any(np.asarray(r["validity"]["per_frame_valid"])[bad])
    n_valid = r["validity"]["n_valid_frames"]
    assert r["coverage"]["n_frames_used"] == n_valid <= rep.n_frames - len(bad)


def test_ca_only_trajectory_gets_ca_checks_only(md_pair, md_files):
    ref = md_pair[0]
    rmsf = np.full(ref.n_residues, 0.03)
    anm = anm_ensemble(ref, rmsf, 30, dt_ns=md_files["dt_ns"], seed=0)
    r = evaluate(ref, anm, md_files["dt_ns"])
    assert r["validity"]["allatom_validity"] is None
    assert r["validity"]["combined_validity"] is None
    assert r["validity"]["ca_validity"] is not None


def test_report_folder_is_replaced_not_mixed(md_pair, md_files, tmp_path):
    ref, rep = md_pair
    out = tmp_path / "rep"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    evaluate(ref, rep, md_files["dt_ns"], str(out), make_plots=False)
    assert os.listdir(out) == ["metrics.json"]
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("fault", ["sequence", "nan", "lag", "energies"])
def test_bad_input_raises_clearly_and_writes_nothing(md_pair, md_files, tmp_path, fault):
    ref, rep = md_pair
    gen, kwargs, match = rep, {}, None
    if fault == "sequence":
        top = rep.topology.copy()
        next(r for r in top.residues if r.name not in ("GLY",)).name = "GLY"
        gen = md.Trajectory(rep.xyz, top)
        match = r"different sequences .* residue 0: \w+ vs GLY"
    elif fault == "nan":
        xyz = rep.xyz.copy()
        xyz[7, 3] = np.nan
        gen = md.Trajectory(xyz, rep.topology)
        match = r"NaN.* 1 of 40 frames \(first: frame 7\)"
    elif fault == "lag":
        gen = rep[:5]
        kwargs = {"tica_lag_ns": 3 * md_files["dt_ns"]}
        match = r"5 frames .* too few .*TICA lag"
    else:
        kwargs = {"energies": np.zeros(3), "reference_energies": np.zeros(ref.n_frames)}
        match = "3 values for 40 frames"
    out = tmp_path / "report"
    with pytest.raises(InputError, match=match):
        evaluate(ref, gen, md_files["dt_ns"], str(out), labels=("ref.dcd", "gen.dcd"), **kwargs)
    assert not out.exists() and not _leftovers(tmp_path)


def test_evaluate_many_tabulates_model_oracle_and_baselines(md_files, tmp_path, capsys):
    folder = os.path.dirname(md_files["replica1"])
    manifest = [
        {"name": name, "reference": md_files["replica1"], "top": md_files["top"],
         "generated": os.path.relpath(md_files["replica2"], tmp_path),
         "replica": md_files["replica2"], "dt_ns": md_files["dt_ns"]}
        for name in ("protA", "protB")
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"targets": manifest}))
    table = evaluate_many(str(path), str(tmp_path / "table"))
    assert "| model | 2 |" in table and "| MD oracle | 2 |" in table
    assert "| ANM | 2 |" in table and "| Gaussian noise | 2 |" in table
    assert table in capsys.readouterr().out
    summary = _strict_json(tmp_path / "table" / "summary.json")
    assert set(summary) == {"protA", "protB"}
    assert set(summary["protA"]) == {"model", "MD oracle", "ANM", "Gaussian noise"}
    assert os.path.exists(tmp_path / "table" / "protA" / "model" / "pca.png")
    assert folder  # the MD files were read in place


def test_evaluate_many_rejects_incomplete_manifest(tmp_path):
    with pytest.raises(InputError, match="lacks generated, dt_ns"):
        evaluate_many([{"name": "x", "reference": "a.dcd", "top": "a.pdb"}], str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def test_all_frames_invalid_still_reports_with_nulls(md_pair, md_files, tmp_path):
    ref, rep = md_pair
    xyz = rep.xyz.copy()
    ca = rep.topology.select("name CA")
    xyz[:, ca[30]] = xyz[:, ca[5]] + 0.01  # a Cα clash in every frame
    out = tmp_path / "bad"
    r = evaluate(ref, md.Trajectory(xyz, rep.topology), md_files["dt_ns"], str(out))
    assert r["validity"]["ca_validity"] == 0.0 and r["validity"]["n_valid_frames"] == 0
    s = r["summary"]
    assert s["pca_jsd"] is None and s["tic0_jsd"] is None and s["vamp2_deviation"] is None
    assert sorted(os.listdir(out)) == sorted(("metrics.json",) + PLOT_FILES)
    _strict_json(out / "metrics.json")


def test_backbone_reference_with_allatom_criteria_from_other_md(md_pair, md_files, tmp_path):
    """A reference holding only N, CA, C, O (as training shards do) gets all-atom validity for the
    generated frames when the thresholds come from other all-atom MD of the protein; the same
    numbers as fitting them on that MD directly, and only Cα checks without them."""
    ref, rep = md_pair
    backbone = ref.atom_slice(ref.topology.select("backbone and (name N or name CA or name C or name O)"))
    assert backbone.n_atoms == 4 * ref.n_residues
    criteria = fit_allatom_criteria(ref)
    with_criteria = evaluate(backbone, rep, md_files["dt_ns"], criteria=criteria)["validity"]
    direct = evaluate(ref, rep, md_files["dt_ns"])["validity"]
    assert with_criteria["allatom_validity"] == direct["allatom_validity"] is not None
    assert with_criteria["ca_validity"] == direct["ca_validity"]
    assert evaluate(backbone, rep, md_files["dt_ns"])["validity"]["allatom_validity"] is None
    # evaluate-many: criteria_reference/criteria_top carry the all-atom MD
    bb_path = str(tmp_path / "backbone.dcd")
    backbone.save_dcd(bb_path)
    backbone[0].save_pdb(str(tmp_path / "backbone.pdb"))
    entry = {"name": "p", "reference": bb_path, "top": str(tmp_path / "backbone.pdb"),
             "generated": md_files["replica2"], "gen_top": md_files["top"], "dt_ns": md_files["dt_ns"],
             "criteria_reference": md_files["replica1"], "criteria_top": md_files["top"]}
    # the oracle row: a backbone replica, its validity from all-atom frames of the same run
    rep_bb = rep.atom_slice(rep.topology.select("backbone and (name N or name CA or name C or name O)"))
    rep_bb.save_dcd(str(tmp_path / "replica_bb.dcd"))
    entry.update(replica=str(tmp_path / "replica_bb.dcd"), replica_top=str(tmp_path / "backbone.pdb"),
                 replica_allatom=md_files["replica2"], replica_allatom_top=md_files["top"])
    evaluate_many([entry], str(tmp_path / "many"), baselines=False, echo=False)
    summary = _strict_json(tmp_path / "many" / "summary.json")
    assert summary["p"]["model"]["allatom_validity"] == pytest.approx(direct["allatom_validity"])
    oracle = summary["p"]["MD oracle"]
    assert oracle["allatom_validity"] == pytest.approx(direct["allatom_validity"])  # replica2 = generated here
    assert oracle["validity_from_allatom_frames"] == rep.n_frames
