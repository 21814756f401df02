"""Kill a job with SIGKILL at random moments, run it again each time, and check that the result equals one
uninterrupted run.

Jobs: ``train`` (a tiny CLIP on the built-in set with two DataLoader workers and training crops, resumed with
``--resume latest``; compared per step by the losses in metrics.jsonl), ``index`` (``contrast index build`` run again
with the same command; compared by the index's vectors and ids) and ``features`` (``contrast features extract``
run again; compared by every shard's tensors). Kill moments are drawn from a seeded generator: some within the
first second (before the first checkpoint), some the moment a checkpoint's temporary directory appears (during its
write), the rest uniformly over the job's measured duration. The whole process group is killed (workers too).

    python eval/bench/kill_resume.py --kills 20               # train, index and features, 20 kills each
    python eval/bench/kill_resume.py --jobs train --kills 3    # what the slow test runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {
    "model": {"kind": "clip", "embed_dim": 32,
              "image": {"name": "vit_tiny_patch16_224", "image_size": 16,
                        "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
              "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}},
    "data": {"source": "synthetic", "num_workers": 2,
             "synthetic": {"train_size": 512, "val_size": 32, "test_size": 600}},
    "loss": {"itc": 1.0},
    "train": {"steps": 60, "batch_size": 16, "lr": 1e-3, "warmup_steps": 5, "log_every": 1, "checkpoint_every": 3,
              "keep_checkpoints": 2, "threads": 1, "device": "cpu", "tensorboard": False},
}


def _contrast(*args: str) -> list[str]:
    return [sys.executable, "-m", "contrast", *args]


def _run(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def _kill_plan(kills: int, duration: float, rng: random.Random) -> list[tuple[str, float]]:
    kinds = ["early"] * max(1, kills // 7) + ["write"] * max(1, kills // 4)
    kinds += ["anytime"] * (kills - len(kinds))
    rng.shuffle(kinds)
    # a run resumed from a checkpoint has less left to do: draw "anytime" within the first third of a whole run
    return [(k, rng.uniform(0.05, 1.0) if k == "early" else rng.uniform(0.0, duration / 3)) for k in kinds[:kills]]


def _temporaries(out: Path) -> set[Path]:
    """Temporary files and directories under ``out``: checkpoints, shards or records being written."""
    return {p for p in out.rglob("*") if ".tmp" in p.name} if out.exists() else set()


def _attempt(cmd: list[str], env: dict, kind: str, delay: float, out: Path) -> str:
    """Start ``cmd``; kill its process group at the planned moment. Returns 'killed', 'killed mid-write' or
    'finished' (it ended before the kill)."""
    left = _temporaries(out)  # what killed attempts left behind does not count as a write under way
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    start = time.perf_counter()
    while proc.poll() is None:
        elapsed = time.perf_counter() - start
        writing = kind == "write" and elapsed > delay and bool(_temporaries(out) - left)
        if writing or (kind != "write" and elapsed >= delay):
            mid_write = bool(_temporaries(out) - left)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "killed mid-write" if mid_write else "killed"
        if kind == "write" and elapsed > delay + 30:  # no write seen in 30 s: kill anyway
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.0005 if kind == "write" else 0.005)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return "finished"


def _kill_until_done(cmd: list[str], env: dict, plan: list[tuple[str, float]], out: Path) -> dict[str, int]:
    counts = {"killed": 0, "killed mid-write": 0, "finished early": 0, "runs": 0}
    for kind, delay in plan:
        counts["runs"] += 1
        what = _attempt(cmd, env, kind, delay, out)
        if what == "finished":
            counts["finished early"] += 1
            continue  # the job completed; the next attempt runs it again (nothing left to do) and may be killed
        counts[what] += 1
    counts["runs"] += 1
    _run(cmd, env)  # the last run, to the end
    return counts


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def train_job(work: Path, env: dict, kills: int, rng: random.Random) -> dict:
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    duration = _run(_contrast("train", str(recipe), "--out", str(work / "ref"), "--no-progress"), env)
    cmd = _contrast("train", str(recipe), "--out", str(work / "killed"), "--resume", "latest", "--no-progress")
    counts = _kill_until_done(cmd, env, _kill_plan(kills, duration, rng), work / "killed" / "checkpoints")
    ref, got = _losses(work / "ref"), _losses(work / "killed")
    if sorted(ref) != sorted(got):
        raise SystemExit(f"train: steps differ: {sorted(set(ref) ^ set(got))}")
    return {**counts, "seconds": duration, "worst": max(abs(ref[s] - got[s]) for s in ref), "compared": f"{len(ref)} step losses"}


def _index_vectors(index: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(index.rglob("*.npy")):
        out[str(p.relative_to(index))] = np.load(p)
    return out


def index_job(work: Path, env: dict, kills: int, rng: random.Random) -> dict:
    model = work / "ref"  # the trained run of the train job (or trained here)
    if not (model / "checkpoints" / "latest").is_file():
        (work / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
        _run(_contrast("train", str(work / "recipe.yaml"), "--out", str(model), "--no-progress"), env)
    args = ["index", "build", "--checkpoint", str(model), "--data", "synthetic", "--split", "test",
            "--shard-size", "64", "--batch-size", "16", "--no-progress"]
    duration = _run(_contrast(*args, "--out", str(work / "index_ref")), env)
    counts = _kill_until_done(_contrast(*args, "--out", str(work / "index_killed")), env,
                              _kill_plan(kills, duration, rng), work / "index_killed")
    ref, got = _index_vectors(work / "index_ref"), _index_vectors(work / "index_killed")
    if ref.keys() != got.keys():
        raise SystemExit(f"index: files differ: {sorted(set(ref) ^ set(got))}")
    worst = max(float(np.abs(ref[k].astype(np.float64) - got[k].astype(np.float64)).max()) if ref[k].size else 0.0
                for k in ref)
    return {**counts, "seconds": duration, "worst": worst, "compared": f"{len(ref)} .npy files"}


def features_job(work: Path, env: dict, kills: int, rng: random.Random) -> dict:
    from safetensors.torch import load_file

    model = work / "ref"
    if not (model / "checkpoints" / "latest").is_file():
        (work / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
        _run(_contrast("train", str(work / "recipe.yaml"), "--out", str(model), "--no-progress"), env)
    args = ["features", "extract", "--checkpoint", str(model), "--split", "test", "--shard-size", "50",
            "--batch-size", "16"]
    duration = _run(_contrast(*args, "--out", str(work / "feats_ref")), env)
    counts = _kill_until_done(_contrast(*args, "--out", str(work / "feats_killed")), env,
                              _kill_plan(kills, duration, rng), work / "feats_killed")
    ref_dir, got_dir = work / "feats_ref" / "test", work / "feats_killed" / "test"
    names = sorted(p.name for p in ref_dir.glob("*.safetensors"))
    if names != sorted(p.name for p in got_dir.glob("*.safetensors")):
        raise SystemExit("features: shard files differ")
    worst = 0.0
    for n in names:
        a, b = load_file(str(ref_dir / n)), load_file(str(got_dir / n))
        worst = max([worst] + [float((a[k].double() - b[k].double()).abs().max()) for k in a])
    if (ref_dir / "captions.json").read_text() != (got_dir / "captions.json").read_text():
        raise SystemExit("features: captions differ")
    return {**counts, "seconds": duration, "worst": worst, "compared": f"{len(names)} shards + captions"}


JOBS = {"train": train_job, "index": index_job, "features": features_job}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="train,index,features")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="kill_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(work / "hf"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    rng = random.Random(args.seed)
    print("| job | runs | kills | of them mid-write | finished before the kill | uninterrupted s | compared | worst difference |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name in args.jobs.split(","):
        r = JOBS[name](work, env, args.kills, rng)
        kills = r["killed"] + r["killed mid-write"]
        print(f"| {name} | {r['runs']} | {kills} | {r['killed mid-write']} | {r['finished early']} | "
              f"{r['seconds']:.1f} | {r['compared']} | {r['worst']:.3g} |", flush=True)
        worst = max(worst, r["worst"])
    print(f"worst difference from the uninterrupted run: {worst:.3g}")
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
