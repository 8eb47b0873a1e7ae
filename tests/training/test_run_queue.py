"""training/run_queue.py: round-robin order, resumability and failure isolation; the committed plan."""
from __future__ import annotations

import json
import os
import subprocess
import sys


from training_helpers import STRUCTURES, TRAINING, load_training_module

run_queue = load_training_module("run_queue")


def _plan(tmp_path, proteins, stages, **extra):
    plan = {"proteins": proteins, "stages": stages, **extra}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def test_round_robin_order(tmp_path):
    pdb = str(STRUCTURES / "2M9I.pdb")
    path = _plan(tmp_path, {"a": {"file": pdb}, "b": {"file": pdb, "replicas": 2}},
                 [{"proteins": ["a", "b"], "ns": 2.5, "chunk_ns": 1.0}, {"proteins": ["a"], "ns": 4.0, "chunk_ns": 2.0}])
    jobs = [(s, n, r, t) for s, n, r, t in run_queue.iter_jobs(run_queue.load_plan(path))]
    assert jobs == [(0, "a", 0, 1.0), (0, "b", 0, 1.0), (0, "b", 1, 1.0),
                    (0, "a", 0, 2.0), (0, "b", 0, 2.0), (0, "b", 1, 2.0),
                    (0, "a", 0, 2.5), (0, "b", 0, 2.5), (0, "b", 1, 2.5),
                    (1, "a", 0, 2.0), (1, "a", 0, 4.0)]


def test_seeds_distinct_and_stable():
    seeds = {run_queue.seed_for(n, r) for n in ("2M9I", "villin_hp35", "1I6C") for r in (0, 1)}
    assert len(seeds) == 6
    assert run_queue.seed_for("2M9I", 1) == run_queue.seed_for("2M9I", 0) + 10**6


def test_queue_runs_resumes_and_isolates_failures(tmp_path, ubiquitin_pdb):
    waters = tmp_path / "waters.pdb"
    waters.write_text("\n".join(l for l in ubiquitin_pdb.read_text().splitlines() if l.startswith("HETATM")) + "\nEND\n")
    path = _plan(tmp_path, {"bad": {"file": str(waters)}, "2M9I": {"file": str(STRUCTURES / "2M9I.pdb")}},
                 [{"proteins": ["bad", "2M9I"], "ns": 0.0016, "chunk_ns": 0.0008}], frame_ps=0.2,
                 simulate_args=["--frame-ps", "0.2", "--equil-ps", "0.2", "--checkpoint-frames", "2"])
    root = tmp_path / "md"
    status = run_queue.run_queue(path, str(root), ["--threads", "1", "--platform", "CPU"])
    assert list(status["failed"]) == ["bad/r0"] and "no standard protein residues" in status["failed"]["bad/r0"]
    run = root / "2M9I" / "r0"
    assert json.loads((run / "checkpoint.json").read_text())["frames"] == 8
    assert json.loads((run / "done").read_text())["frames"] == 8
    record = json.loads((run / "record.json").read_text())
    assert [s["end_frame"] for s in record["segments"]] == [4, 8]  # grown in two rounds
    assert record["settings"]["seed"] == run_queue.seed_for("2M9I", 0)
    # a second pass finds everything done and runs nothing
    again = run_queue.run_queue(path, str(root), ["--threads", "1", "--platform", "CPU"])
    assert json.loads((run / "record.json").read_text())["segments"] == record["segments"]
    assert again["current"] is None


def test_stop_file(tmp_path):
    path = _plan(tmp_path, {"2M9I": {"file": str(STRUCTURES / "2M9I.pdb")}}, [{"proteins": ["2M9I"], "ns": 1.0}])
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "STOP").write_text("")
    run_queue.run_queue(path, str(tmp_path / "md"), [])
    assert not (tmp_path / "md" / "2M9I").exists()


def test_committed_plan_reaches_the_data_floor():
    """≥ 10 proteins of 10-70 residues grown to ≥ 4 ns first, 3 test proteins with 2 replicas."""
    plan = run_queue.load_plan(str(TRAINING / "plan.json"))
    structures = {e["name"]: e for e in json.loads((STRUCTURES / "structures.json").read_text())["structures"]}
    floor = plan["stages"][0]
    assert floor["ns"] >= 4.0 and plan["frame_ps"] == 10.0
    assert len(floor["proteins"]) >= 10
    for name in floor["proteins"]:
        assert 10 <= structures[name]["prepare"]["n_residues"] <= 70
    test = [n for n in floor["proteins"] if plan["proteins"][n]["split"] == "test"]
    assert len(test) == 3 and all(plan["proteins"][n]["replicas"] == 2 for n in test)
    assert {"train", "validation", "test"} <= {p["split"] for p in plan["proteins"].values()}
    sizes = [structures[n]["prepare"]["n_residues"] for n in floor["proteins"]]
    assert sizes == sorted(sizes)  # smallest first


def test_workers_skip_trajectories_another_live_worker_holds(tmp_path):
    """A second worker never grows a trajectory whose lock a live process holds; a dead one's lock is taken."""
    path = _plan(tmp_path, {"2M9I": {"file": str(STRUCTURES / "2M9I.pdb")}},
                 [{"proteins": ["2M9I"], "ns": 0.0008, "chunk_ns": 0.0008}], frame_ps=0.2,
                 simulate_args=["--frame-ps", "0.2", "--equil-ps", "0.2", "--checkpoint-frames", "2"])
    root = tmp_path / "md"
    (root / "2M9I").mkdir(parents=True)
    lock = root / "2M9I" / "r0.lock"
    lock.write_text(str(os.getppid()))  # a live process that is not this worker
    run_queue.run_queue(path, str(root), ["--threads", "1", "--platform", "CPU"], worker="b")
    assert not (root / "2M9I" / "r0").exists() and lock.read_text() == str(os.getppid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # its worker died: the lock is stale
    status = run_queue.run_queue(path, str(root), ["--threads", "1", "--platform", "CPU"], worker="b")
    assert json.loads((root / "2M9I" / "r0" / "done").read_text())["frames"] == 4
    assert not lock.exists() and status["worker"] == "b"
    assert (root / "queue_status_b.json").exists()
