#!/usr/bin/env python
"""Run the default model's release procedure (training/TRAINING.md) as one resumable command.

    python training/release.py --dry-run        # the plan: every command, and which steps are done
    python training/release.py                  # run it, or continue it after a cut-off
    python training/release.py --rehearsal --out training/runs/rehearsal   # below the floor, bundled model untouched

The procedure is the one written down before the floor data existed, step for step:

1. ``floor``: ``prepare.py --no-build --check-floor`` must pass on the shards as built (run
   ``python training/prepare.py`` first to turn the latest MD into shards; ``--rehearsal`` skips it);
2. ``train_a`` / ``train_b``: the A/B of ``configs/mini_atlas_cpu.yaml``, fixed prior vs a prior
   growing as Δt^0.25, side by side with one thread each, into ``OUT/a`` and ``OUT/b``;
3. ``select``: ``select_model.py`` on the validation proteins (t_min 0.01 / 0.03 / 0.05, Δt
   0.01 / 0.1 / 1 ns, 50 frames), its pre-registered rule picks model and t_min;
4. ``export``: the pick's checkpoint becomes the bundled ``openmm_starmd/data/starmd_default.pt``
   with its t_min (the model it replaces is kept as ``OUT/previous_default.pt`` first);
5. the model card's numbers, all on proteins the model never saw, two at a time: ``model_card``
   (facts table; the loss curves are each run's ``loss.png``), ``denoise`` (validation), ``rollout_test`` (test split, the new
   model and the previous one), ``fidelity`` (benchmark 3 at 1 ns and the finest Δt, frames as the
   integrator makes them) and ``fidelity_raw`` (the same with the network's own frames, no Cα projection),
   ``long_horizon`` (benchmark 2: 1 μs on the test proteins) then ``long_horizon_10us`` (villin
   continued to 10 μs), and ``peptide_test`` (the integrator test with the bundled model).

Every step runs as a subprocess with ``OMP_NUM_THREADS=1`` and ``OPENMM_CPU_THREADS=1`` and its own log ``OUT/logs/<step>.log``;
``OUT/release.json`` records each step's command, start, end and exit status. Rerunning the same
command skips the steps recorded as done whose outputs exist, resumes the training runs from their
checkpoints (``--resume auto``) and the long-horizon runs from their state files, and reruns
whatever failed or was cut off. A release started on one manifest is not continued on another
(the trajectories grew in between): the message says to start a new ``--out``. A step counts as
done only while its outputs have the sha256 recorded when it ended.

Across machines (every session of ours starts on a fresh clone, with ``training/runs/`` empty):
``release.py --save`` packs OUT (records, logs, training checkpoints, outputs; ~10-20 MB) into
``training/release_state/<OUT name>.tar.gz`` to commit (the default OUT also saves itself there
every 15 minutes and after each step, ``--save-every``); the release command on a clone whose OUT
has no ``release.json`` unpacks it first and goes on. The bundled model a cut-off release
exported is not trusted unless committed: its sha256 must match the record, else export reruns.

The MD queue should be stopped while this runs (``touch training/md/STOP``): both cores are used.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from openmm_starmd.data import sha256_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
BUNDLED = os.path.join(ROOT, "openmm_starmd", "data", "starmd_default.pt")
DEFAULT_MANIFEST = os.path.join(HERE, "data", "manifest.json")
DEFAULT_CONFIG = os.path.join(HERE, "configs", "mini_atlas_cpu.yaml")

#: The A/B and the selection grid, as fixed in TRAINING.md before the floor data existed.
VARIANT_B = ["--model", "anchor_prior_dt_exponent=0.25"]
SELECT_T_MIN = ["0.01", "0.03", "0.05"]
SELECT_DT_NS = ["0.01", "0.1", "1.0"]
SELECT_FRAMES = 50
ROLLOUT_DT_NS = ["0.01", "0.1", "0.3", "1.0"]


def _queue_running() -> bool:
    """Whether an MD queue worker (training/run_queue.py) is running on this machine.

    pgrep without a shell: through ``os.system`` the shell's own command line matched the pattern.
    """
    try:
        return subprocess.run(["pgrep", "-f", "training/run_queue[.]py"], capture_output=True).returncode == 0
    except OSError:  # no pgrep
        return False


class ReleaseError(RuntimeError):
    """The release cannot go on; the message names the problem and the fix."""


@dataclass
class Step:
    """One command of the procedure.

    ``outputs`` must all exist for a recorded success to count as done; ``prepare`` runs in this
    process just before the command (it may change ``argv``, e.g. to add ``--resume auto``);
    ``stdout``, when set, is a file that receives the command's standard output (written to a
    temporary name, renamed on success).
    """

    name: str
    argv: list
    outputs: list = field(default_factory=list)
    after: list = field(default_factory=list)
    prepare: object = None
    stdout: str | None = None


def _shown(path: str) -> str:
    """A path relative to the repository when inside it (as it is recorded in model metadata)."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def _chosen(out: str) -> tuple[str, float]:
    """(training run directory, t_min) of select.json's pick (found in ``out`` by its name when
    the release was restored to another path)."""
    with open(os.path.join(out, "select.json")) as fh:
        chosen = json.load(fh)["chosen"]
    run = os.path.dirname(os.path.abspath(chosen["model"]))
    if not os.path.isdir(run):
        run = os.path.join(out, os.path.basename(run))
    return run, float(chosen["t_min"])


def plan(args) -> list[Step]:
    """The steps of the procedure (module docstring) for these options."""
    out, manifest = args.out, args.manifest
    target = os.path.join(out, "default.pt") if args.rehearsal else BUNDLED
    previous = os.path.join(out, "previous_default.pt")
    runs = {"a": os.path.join(out, "a"), "b": os.path.join(out, "b")}
    steps: list[Step] = []
    if not args.rehearsal:
        steps.append(Step("floor", [PY, "training/prepare.py", "--manifest", manifest, "--no-build", "--check-floor"]))
    floor = [] if args.rehearsal else ["floor"]

    def train(variant: str) -> Step:
        run = runs[variant]
        argv = [PY, "training/train.py", "--config", args.config, "--manifest", manifest, "--out", run,
                "--export", os.path.join(run, "model.pt"), "--no-progress"]
        argv += VARIANT_B if variant == "b" else []
        argv += ["--steps", str(args.steps)] if args.steps else []

        def resume(step: Step) -> None:
            if os.path.exists(os.path.join(run, "checkpoint.pt")) and "--resume" not in step.argv:
                step.argv += ["--resume", "auto"]
        return Step(f"train_{variant}", argv, [os.path.join(run, "model.pt"), os.path.join(run, "loss.png")], floor,
                    resume)

    steps += [train("a"), train("b")]
    select_json = os.path.join(out, "select.json")
    steps.append(Step("select", [PY, "training/select_model.py", os.path.join(runs["a"], "model.pt"),
                                 os.path.join(runs["b"], "model.pt"), "--manifest", manifest,
                                 "--t-min", *SELECT_T_MIN, "--dt-ns", *SELECT_DT_NS,
                                 "--frames", str(args.frames), "--json", select_json],
                      [select_json], ["train_a", "train_b"]))

    def export(step: Step) -> None:
        run, t_min = _chosen(out)
        if not os.path.exists(previous) and os.path.exists(BUNDLED):
            shutil.copyfile(BUNDLED, previous)
        step.argv[2:] = [os.path.join(run, "checkpoint.pt"), target, "--sampling", f"t_min={t_min:g}",
                         "--note", f"release {os.path.basename(os.path.abspath(out))}: picked by select_model.py "
                                   f"({_shown(select_json)})"]
    steps.append(Step("export", [PY, "training/export.py", "<pick>"], [target], ["select"], export))

    ev = ["export"]
    facts = os.path.join(out, "model_card_facts.md")
    steps.append(Step("model_card", [PY, "training/model_card.py", target, "--manifest", manifest], [facts], ev,
                      stdout=facts))
    steps.append(Step("denoise", [PY, "training/denoise_check.py", target, "--manifest", manifest, "--split",
                                  "validation", "--json", os.path.join(out, "denoise_validation.json")],
                      [os.path.join(out, "denoise_validation.json")], ev))
    rollout = ["--manifest", manifest, "--split", "test", "--dt-ns", *ROLLOUT_DT_NS, "--frames", str(args.frames)]
    steps.append(Step("rollout_test", [PY, "training/rollout_check.py", target, *rollout,
                                       "--json", os.path.join(out, "rollout_test.json")],
                      [os.path.join(out, "rollout_test.json")], ev))
    steps.append(Step("rollout_test_previous", [PY, "training/rollout_check.py", previous, *rollout,
                                                "--json", os.path.join(out, "rollout_test_previous.json")],
                      [os.path.join(out, "rollout_test_previous.json")], ev))
    steps.append(Step("fidelity", [PY, "benchmarks/fidelity_table.py", "--model", f"default={target}",
                                   "--dt-ns", "1.0", "finest", "--out", os.path.join(out, "fidelity")],
                      [os.path.join(out, "fidelity", "fidelity.md")], ev))
    steps.append(Step("fidelity_raw", [PY, "benchmarks/fidelity_table.py", "--model", f"default={target}",
                                       "--dt-ns", "1.0", "finest", "--no-ca-geometry",
                                       "--out", os.path.join(out, "fidelity_raw")],
                      [os.path.join(out, "fidelity_raw", "fidelity.md")], ev))
    lh = os.path.join(out, "long_horizon")
    steps.append(Step("long_horizon", [PY, "benchmarks/long_horizon.py", "--model", target, "--manifest", manifest,
                                       "--out", lh], [os.path.join(lh, "long_horizon.json")], ev))
    steps.append(Step("long_horizon_10us", [PY, "benchmarks/long_horizon.py", "--model", target, "--manifest",
                                            manifest, "--protein", "villin_hp35", "--time-ns", "10000", "--out", lh],
                      [os.path.join(lh, "villin_hp35", "state.npz")], ["long_horizon"]))
    if not args.rehearsal:
        steps.append(Step("peptide_test", [PY, "-m", "pytest", "-q", "tests/test_integrator.py", "-k", "peptide"], [], ev))
    return steps


# ------------------------------------------------------------------------------------ state
def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def load_state(path: str) -> dict:
    if not os.path.exists(path):
        return {"steps": {}}
    with open(path) as fh:
        return json.load(fh)


def save_state(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=1)
    os.replace(tmp, path)


def is_done(step: Step, state: dict) -> bool:
    """Recorded as a success, its outputs exist, and those outside OUT (the bundled model) have the
    sha256 recorded when it ended: on a fresh clone the bundled model is the committed one, not
    the one a cut-off release exported. (Outputs inside OUT may be rewritten by later steps, e.g.
    long_horizon.json by the 10 μs continuation, and travel with OUT anyway.)"""
    rec = state["steps"].get(step.name)
    if not (rec and rec.get("rc") == 0 and all(os.path.exists(p) for p in step.outputs)):
        return False
    recorded = rec.get("output_sha256", {})
    return all(sha256_file(p) == recorded[_shown(p)] for p in step.outputs if _shown(p) in recorded)


def _output_digests(step: Step, out: str) -> dict:
    inside = os.path.abspath(out) + os.sep
    return {_shown(p): sha256_file(p) for p in step.outputs
            if os.path.isfile(p) and not os.path.abspath(p).startswith(inside)}


# ------------------------------------------------------------------ state across machines
#: Committed copies of unfinished releases (``--save``): every session of ours starts on a fresh
#: clone, where training/runs/ is empty.
DEFAULT_STATE_DIR = os.path.join(HERE, "release_state")
#: Files larger than this are left out of a saved release (none of its outputs come close).
SAVE_MAX_BYTES = 50 * 1024 * 1024


def saved_path(out: str, state_dir: str) -> str:
    return os.path.join(state_dir, os.path.basename(os.path.abspath(out)) + ".tar.gz")


def save_release(out: str, state_dir: str) -> str:
    """Pack ``out`` (records, logs, training checkpoints, outputs) into ``state_dir`` to commit,
    so the release continues on another machine. Returns the archive's path."""
    import tarfile

    if not os.path.exists(os.path.join(out, "release.json")):
        raise ReleaseError(f"{out}: no release.json, nothing to save; run the release first.")
    os.makedirs(state_dir, exist_ok=True)
    path = saved_path(out, state_dir)
    left_out = []

    def keep(info):
        if info.isfile() and info.size > SAVE_MAX_BYTES:
            left_out.append(info.name)
            return None
        if info.name.endswith(".tmp"):
            return None
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(os.listdir(out)):
            tar.add(os.path.join(out, name), arcname=name, filter=keep)
    os.replace(tmp, path)
    print(f"saved {out} to {_shown(path)} ({os.path.getsize(path) / 1e6:.1f} MB)"
          + (f"; left out (over {SAVE_MAX_BYTES >> 20} MB): {left_out}" if left_out else "")
          + "; commit it, and the same release command continues on a fresh clone.", flush=True)
    return path


def restore_release(out: str, state_dir: str) -> bool:
    """Unpack a saved release into ``out`` when ``out`` has none. Returns True if it did."""
    import tarfile

    path = saved_path(out, state_dir)
    if os.path.exists(os.path.join(out, "release.json")) or not os.path.exists(path):
        return False
    os.makedirs(out, exist_ok=True)
    with tarfile.open(path, "r:gz") as tar:
        tar.extractall(out, filter="data")
    print(f"[{_now()}] restored the saved release {_shown(path)} into {out}", flush=True)
    return True


def check_manifest(state: dict, manifest: str, out: str) -> None:
    """Record the manifest's sha256 on the first run; refuse to continue on a different one."""
    if not os.path.exists(manifest):
        raise ReleaseError(f"{manifest}: no manifest; build the shards with `python training/prepare.py` first.")
    digest = sha256_file(manifest)
    started = state.get("manifest_sha256")
    if started is None:
        state["manifest_sha256"] = digest
        state["manifest"] = manifest
    elif started != digest:
        raise ReleaseError(f"{out} holds a release started on another version of {manifest} (sha256 {started[:12]}..., "
                           f"now {digest[:12]}...): its models were trained on other data. Start a new release with "
                           "--out NEW_DIR (or delete the old one).")


def select_until(steps: list[Step], until: str | None) -> list[Step]:
    """``until`` and the steps it needs, in plan order; all steps when None."""
    if until is None:
        return steps
    by_name = {s.name: s for s in steps}
    if until not in by_name:
        raise ReleaseError(f"--until {until}: no such step; the steps are {', '.join(by_name)}.")
    keep, todo = set(), [until]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += [d for d in by_name[name].after if d in by_name]
    return [s for s in steps if s.name in keep]


def run(args) -> int:
    if args.state_dir:
        restore_release(args.out, args.state_dir)
    steps = select_until(plan(args), args.until)
    last_save = time.time()

    def autosave(reason: str) -> None:
        nonlocal last_save
        if args.state_dir and args.save_every > 0:
            print(f"[{_now()}] saving the release ({reason})", flush=True)
            save_release(args.out, args.state_dir)
            last_save = time.time()
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    state_path = os.path.join(args.out, "release.json")
    state = load_state(state_path)
    check_manifest(state, args.manifest, args.out)
    state.setdefault("rehearsal", bool(args.rehearsal))
    save_state(state_path, state)
    by_name = {s.name: s for s in steps}
    pending = [s for s in steps if not is_done(s, state)]
    for s in steps:
        if s not in pending:
            print(f"[{_now()}] {s.name}: done earlier, skipped", flush=True)
    if _queue_running():
        print("note: the MD queue is running and shares the cores (stop it with `touch training/md/STOP`).", flush=True)
    # one thread each, OpenMM's CPU platform too: two steps share two cores, and a one-thread
    # backmap is bitwise reproducible (a multithreaded one sums forces in varying order: on 2M9I
    # at 1 ns that moved the fidelity table's model validity between 0/20 and 3/20 frames)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENMM_CPU_THREADS="1")
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    failed: set[str] = set()
    while pending or running:
        for s in list(pending):
            if len(running) >= args.jobs:
                break
            deps = [by_name[d] for d in s.after if d in by_name]
            if any(d.name in failed for d in deps):
                print(f"[{_now()}] {s.name}: not run, it needs {', '.join(d.name for d in deps if d.name in failed)}",
                      flush=True)
                pending.remove(s)
                failed.add(s.name)
                continue
            if not all(is_done(d, state) for d in deps):
                continue
            if s.prepare is not None:
                s.prepare(s)
            log = open(os.path.join(args.out, "logs", f"{s.name}.log"), "a")
            log.write(f"\n# {_now()} {shlex.join(s.argv)}\n")
            log.flush()
            stdout = open(s.stdout + ".tmp", "w") if s.stdout else log
            proc = subprocess.Popen(s.argv, cwd=ROOT, env=env, stdout=stdout, stderr=log)
            running[s.name] = (proc, log, stdout)
            state["steps"][s.name] = {"command": shlex.join(s.argv), "started": _now(), "rc": None,
                                      "log": _shown(log.name)}
            save_state(state_path, state)
            pending.remove(s)
            print(f"[{_now()}] {s.name}: started ({shlex.join(s.argv)})", flush=True)
        if not running:
            if pending:  # only steps whose dependencies can never be met
                for s in pending:
                    failed.add(s.name)
                    print(f"[{_now()}] {s.name}: not run", flush=True)
                pending.clear()
            break
        time.sleep(args.poll)
        if running and time.time() - last_save > 60 * args.save_every:
            autosave(f"every {args.save_every:g} min")
        for name, (proc, log, stdout) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            log.close()
            if stdout is not log:
                stdout.close()
                if rc == 0:
                    os.replace(by_name[name].stdout + ".tmp", by_name[name].stdout)
                else:  # no partial output left behind
                    os.remove(by_name[name].stdout + ".tmp")
            rec = state["steps"][name]
            rec.update(rc=rc, ended=_now())
            save_state(state_path, state)
            if rc != 0:
                failed.add(name)
                print(f"[{_now()}] {name}: FAILED (exit {rc}); see {rec['log']}", flush=True)
                if name == "floor":
                    print("  the floor is checked on the shards in the manifest: if the MD has grown since they "
                          "were built, run `python training/prepare.py` first.", flush=True)
            elif not all(os.path.exists(p) for p in by_name[name].outputs):
                failed.add(name)
                missing = [p for p in by_name[name].outputs if not os.path.exists(p)]
                print(f"[{_now()}] {name}: exit 0 but {missing} missing; see {rec['log']}", flush=True)
            else:
                rec["output_sha256"] = _output_digests(by_name[name], args.out)
                save_state(state_path, state)
                print(f"[{_now()}] {name}: done", flush=True)
                autosave(f"{name} done")
    if failed:
        print(f"release stopped with {len(failed)} step(s) not done: {', '.join(sorted(failed))}; fix the cause and "
              "rerun the same command to continue.", flush=True)
        return 1
    print(f"release complete; record in {state_path}", flush=True)
    return 0


def dry_run(args) -> int:
    state = load_state(os.path.join(args.out, "release.json"))
    for s in select_until(plan(args), args.until):
        mark = "done" if is_done(s, state) else "to do"
        after = f"  (after {', '.join(s.after)})" if s.after else ""
        print(f"{s.name:22s} {mark:6s} {shlex.join(s.argv)}{after}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("training", "runs", "release"),
                   help="directory of this release: training runs a/ and b/, select.json, evaluations, logs/, release.json")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="training recipe of both variants")
    p.add_argument("--rehearsal", action="store_true",
                   help="run below the data floor and export to OUT/default.pt; the bundled model is not touched")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's); for rehearsals")
    p.add_argument("--frames", type=int, default=SELECT_FRAMES,
                   help="frames per rollout of select and rollout_test; change only for rehearsals")
    p.add_argument("--jobs", type=int, default=2, help="steps run at once (one thread each)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between checks of running steps")
    p.add_argument("--until", default=None, metavar="STEP",
                   help="run only STEP and the steps it needs (e.g. --until export: train, select and export now, "
                        "the evaluations later)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and which steps are done, run nothing")
    p.add_argument("--save", action="store_true",
                   help="pack OUT into --state-dir to commit (a session ending mid-release); the release command "
                        "restores it on a clone whose OUT is empty")
    p.add_argument("--state-dir", default=None,
                   help="where --save puts, and a run looks for, saved releases (default training/release_state "
                        "for the default --out, else none)")
    p.add_argument("--save-every", type=float, default=15.0,
                   help="with a state dir, also save OUT there every this many minutes and after each step "
                        "(0: only --save), so a session that ends unexpectedly leaves a recent copy to commit")
    args = p.parse_args(argv)
    default_out = os.path.abspath(os.path.join(ROOT, "training", "runs", "release"))
    args.out = os.path.abspath(args.out)
    if args.state_dir is None and args.out == default_out:
        args.state_dir = DEFAULT_STATE_DIR
    args.manifest = os.path.abspath(args.manifest)
    args.config = os.path.abspath(args.config)
    if not args.rehearsal and (args.steps or args.frames != SELECT_FRAMES):
        p.error("--steps and --frames change the procedure; they are for --rehearsal runs only.")
    try:
        if args.save:
            if not args.state_dir:
                p.error("--save needs --state-dir for an --out other than the default.")
            save_release(args.out, args.state_dir)
            return 0
        if args.dry_run:
            if args.state_dir:
                restore_release(args.out, args.state_dir)
            return dry_run(args)
        return run(args)
    except ReleaseError as exc:
        print(f"release.py: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
