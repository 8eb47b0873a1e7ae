#!/usr/bin/env python
"""Walk a plan of reference-MD jobs in order, resumably, in one long-lived process.

The plan (``training/plan.json``, committed) lists proteins, their split and replica counts,
and ordered *stages*; each stage grows a set of trajectories to a length in rounds of
``chunk_ns``: round k extends every (protein, replica) of the stage to ``min(k * chunk_ns, ns)``
before any trajectory gets round k + 1. Short chunks, smallest proteins first, mean every
protein grows together and the data floor (10 proteins x 4 ns, 3 test proteins x 2 replicas) is
reached as early as possible and is usable (partially) at any moment.

Each job is ``training/simulate.py``'s :func:`run` on ``<md-root>/<protein>/r<k>/``; a killed
queue resumes at the last checkpoint of the job it was in, because every job is resumable and
finished ones are skipped. A failing job (e.g. a blow-up) is logged, recorded in
``queue_status.json`` and its trajectory is skipped in later rounds; the queue goes on.
Create ``<md-root>/STOP`` to stop cleanly between checkpoints of jobs.

Several queues may walk the same plan at once (``--worker NAME``, e.g. one per core or GPU):
each claims a trajectory with a lock file ``<md-root>/<protein>/r<k>.lock`` holding its pid,
skips trajectories another live worker holds, and takes over the lock of a dead one.

Seeds are derived from the protein name and replica (``crc32(name) % 10**6 + 10**6 * replica``)
so reruns are reproducible and replicas independent.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import simulate  # noqa: E402  (training/ is a folder of scripts, not a package)

DEFAULT_PLAN = os.path.join(HERE, "plan.json")
DEFAULT_ROOT = os.path.join(HERE, "md")


def seed_for(name: str, replica: int) -> int:
    """Deterministic, distinct seed per (protein, replica)."""
    return zlib.crc32(name.encode()) % 10**6 + 10**6 * replica


def load_plan(path: str) -> dict:
    """Read a plan JSON and resolve structure paths relative to the plan file."""
    with open(path) as fh:
        plan = json.load(fh)
    base = os.path.dirname(os.path.abspath(path))
    for name, p in plan["proteins"].items():
        p["path"] = os.path.normpath(os.path.join(base, p["file"]))
        if not os.path.exists(p["path"]):
            raise FileNotFoundError(f"{path}: structure of {name} ({p['path']}) is missing; run training/fetch_structures.py.")
    return plan


def iter_jobs(plan: dict):
    """Yield (stage index, protein, replica, target_ns) in queue order."""
    for si, stage in enumerate(plan["stages"]):
        chunk = float(stage.get("chunk_ns", 1.0))
        goal = float(stage["ns"])
        n_rounds = int(-(-goal // chunk))
        for k in range(1, n_rounds + 1):
            target = min(k * chunk, goal)
            for name in stage["proteins"]:
                for r in range(int(plan["proteins"][name].get("replicas", 1))):
                    yield si, name, r, round(target, 6)


def _log(msg: str) -> None:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] queue: {msg}", file=sys.stderr, flush=True)


def job_args(plan: dict, name: str, replica: int, target_ns: float, root: str, extra: list[str]):
    """The simulate.py argument namespace of one job."""
    prot = plan["proteins"][name]
    argv = [prot["path"], "--out", os.path.join(root, name, f"r{replica}"), "--ns", str(target_ns),
            "--seed", str(seed_for(name, replica))]
    if prot.get("prepare_options", {}).get("replace_nonstandard"):
        argv.append("--replace-nonstandard")
    argv += [str(x) for x in plan.get("simulate_args", [])] + extra
    return simulate.build_parser().parse_args(argv)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(run_dir: str) -> bool:
    """Take the lock of one trajectory; False when another live worker holds it."""
    lock = run_dir.rstrip(os.sep) + ".lock"
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as fh:
                    holder = int(fh.read().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder == os.getpid():
                return True
            if holder and _pid_alive(holder):
                return False
            if not holder:
                # created but not written yet (another worker is between O_EXCL and its write),
                # unless it has been empty for a while (a worker that died right there)
                try:
                    if time.time() - os.path.getmtime(lock) < 60:
                        return False
                except FileNotFoundError:
                    continue
            try:  # a dead worker's lock: take it over
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def release(run_dir: str) -> None:
    """Drop this worker's lock of one trajectory (if it holds it)."""
    lock = run_dir.rstrip(os.sep) + ".lock"
    try:
        with open(lock) as fh:
            if fh.read().strip() == str(os.getpid()):
                os.remove(lock)
    except FileNotFoundError:
        pass


def status_path_for(root: str, worker: str) -> str:
    """The status file of one worker (``queue_status.json`` for the default worker "0")."""
    return os.path.join(root, "queue_status.json" if worker == "0" else f"queue_status_{worker}.json")


def run_queue(plan_path: str, root: str, extra: list[str], max_jobs: int | None = None,
              worker: str = "0", restore: tuple[str, str] | None = None) -> dict:
    """Run every job of the plan that is not finished yet. Returns the status dict.

    ``worker`` names this queue when several walk the same plan; failures recorded by any
    worker are skipped by all. ``restore`` = (manifest path, committed-state root): before a
    trajectory's first job on this machine, its run directory is restored from the committed
    shard and state (``restore_md.ensure_run_dir``), so a fresh clone continues the MD instead
    of starting it again.
    """
    plan = load_plan(plan_path)
    os.makedirs(root, exist_ok=True)
    status_path = status_path_for(root, worker)
    status = {"failed": {}, "pid": os.getpid(), "worker": worker,
              "started": _dt.datetime.now().isoformat(timespec="seconds")}
    for name in sorted(os.listdir(root)):
        if name.startswith("queue_status") and name.endswith(".json"):
            try:
                with open(os.path.join(root, name)) as fh:
                    failed = json.load(fh).get("failed", {})
            except (OSError, ValueError):
                continue
            status["failed"].update(failed)
    n = 0
    for si, name, r, target in iter_jobs(plan):
        key = f"{name}/r{r}"
        if os.path.exists(os.path.join(root, "STOP")):
            _log("STOP file found; exiting")
            break
        if key in status["failed"]:
            continue
        run_dir = os.path.join(root, name, f"r{r}")
        frame_ps = float(plan.get("frame_ps", 10.0))
        if simulate.read_checkpoint_frames(run_dir) >= round(target * 1000 / frame_ps):
            continue
        if not claim(run_dir):
            continue  # another worker is growing this trajectory
        try:
            if restore is not None:
                import restore_md

                try:
                    what = restore_md.ensure_run_dir(run_dir, job_args(plan, name, r, target, root, extra), name,
                                                     r, restore[0], restore[1], log=_log)
                except Exception as exc:  # e.g. the structure changed: skip this trajectory, go on
                    _log(f"{key} RESTORE FAILED: {exc}\n{traceback.format_exc()}")
                    status["failed"][key] = f"restore: {type(exc).__name__}: {exc}"
                    continue
                if what in ("exact", "reconstructed"):
                    _log(f"{key}: restored ({what}) at frame {simulate.read_checkpoint_frames(run_dir)}")
            if simulate.read_checkpoint_frames(run_dir) >= round(target * 1000 / frame_ps):
                continue  # finished by another worker between the check and the claim, or restored
            _log(f"stage {si} {key} -> {target} ns (worker {worker})")
            status.update(current=key, target_ns=target, stage=si)
            simulate._atomic_write_json(status_path, status)
            try:
                simulate.run(job_args(plan, name, r, target, root, extra))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one bad protein must not stop hours of generation
                _log(f"{key} FAILED: {exc}\n{traceback.format_exc()}")
                status["failed"][key] = f"{type(exc).__name__}: {exc}"
        finally:
            release(run_dir)
        n += 1
        if max_jobs is not None and n >= max_jobs:
            break
    status.update(current=None, finished=_dt.datetime.now().isoformat(timespec="seconds"))
    simulate._atomic_write_json(status_path, status)
    _log("queue finished" if n == 0 or max_jobs is None or n < max_jobs else f"stopped after {n} jobs")
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--plan", default=DEFAULT_PLAN, help="plan JSON (proteins, splits, replicas, stages)")
    p.add_argument("--root", default=DEFAULT_ROOT, help="output root: <root>/<protein>/r<k>/")
    p.add_argument("--max-jobs", type=int, default=None, help="stop after this many jobs")
    p.add_argument("--list", action="store_true", help="print the job order and exit")
    p.add_argument("--worker", default="0",
                   help="name of this queue when several walk the same plan (one per core or GPU); "
                        "trajectories are claimed with lock files, so workers never share one")
    p.add_argument("--manifest", default=None,
                   help="manifest whose shards a fresh machine continues (restore_md.py); default "
                        "training/data/manifest.json when --root is the default, else none")
    p.add_argument("--state-root", default=None, help="committed MD state (default training/md_state)")
    args, extra = p.parse_known_args(argv)
    if args.list:
        plan = load_plan(args.plan)
        for si, name, r, target in iter_jobs(plan):
            print(si, f"{name}/r{r}", target)
        return 0
    # Anything not recognised here goes to simulate.py (e.g. --threads 1 --platform CPU).
    manifest, state_root = args.manifest, args.state_root
    if os.path.abspath(args.root) == DEFAULT_ROOT:
        manifest = manifest or os.path.join(HERE, "data", "manifest.json")
        state_root = state_root or os.path.join(HERE, "md_state")
    restore = (manifest, state_root or os.path.join(HERE, "md_state")) if manifest else None
    run_queue(args.plan, args.root, extra, args.max_jobs, args.worker, restore=restore)
    return 0


if __name__ == "__main__":
    sys.exit(main())
