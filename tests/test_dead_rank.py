"""Lost ranks: the heartbeat on a real TCPStore, and torchrun runs (gloo) where one rank is SIGKILLed mid-step or
where every rank evaluates during and after training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml
from conftest import tiny_model_dict

from contrast import distributed as D
from contrast import runs as R
from contrast.train import checkpoint as C


def _store_pair():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    return server, lambda: dist.TCPStore("127.0.0.1", server.port, is_master=False)


def _beats(world: int, lost_after: float):
    server, client = _store_pair()
    seen: dict[int, tuple[list[int], str, float]] = {}
    done = threading.Event()

    def on_lost(rank):
        def record(ranks, reason):
            seen[rank] = (ranks, reason, time.monotonic())
            done.set()
        return record

    beats = [D.Heartbeat(client(), r, world, lost_after, on_lost(r)) for r in range(world)]
    for b in beats:
        b.register()
    for b in beats:
        b.start()
    return server, beats, seen


def test_a_silent_rank_is_named_by_every_other_rank_within_the_bound():
    server, beats, seen = _beats(3, lost_after=1.0)
    time.sleep(0.5)
    beats[1].stop()  # finished: its silence is not a loss
    beats[2]._stop.set()  # dies: its counter stands still, nothing is marked
    died = time.monotonic()
    deadline = died + 5
    while len(seen) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert seen[0][:2] == ([2], "no sign of life for 1 s")
    tick = beats[0].interval  # silence is timed from the last change seen, up to a tick before the death
    assert 1.0 - tick <= seen[0][2] - died < 1.0 + 3 * tick
    assert 1 not in seen and 2 not in seen  # the finished rank's thread ended quietly; the dead one never reports
    beats[0]._stop.set()


def test_a_rank_that_fails_is_named_with_its_reason():
    server, beats, seen = _beats(2, lost_after=30.0)
    beats[1].fail("data file missing on this node")
    deadline = time.monotonic() + 5
    while 0 not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[0][:2] == ([1], "stopped with an error: data file missing on this node")
    assert beats[0].quiet_ranks() == ([1], "stopped with an error: data file missing on this node")


def test_quiet_ranks_names_the_one_whose_counter_stands_still():
    server, beats, seen = _beats(3, lost_after=30.0)
    time.sleep(0.3)
    beats[2]._stop.set()
    assert beats[0].quiet_ranks()[0] == [2]
    for b in beats[:2]:
        b._stop.set()


# --------------------------------------------------------------------------------------------------- torchrun


def _recipe(path: Path, cache: str, steps: int, **train) -> Path:
    recipe = {
        "model": tiny_model_dict("clip"),
        "data": {"source": "synthetic", "cache_dir": cache, "num_workers": 0,
                 "synthetic": {"train_size": 256, "val_size": 32, "test_size": 64}},
        "loss": {"itc": 1.0},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "threads": 1,
                  "device": "cpu", **train},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _torchrun(recipe: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "contrast", "train", str(recipe), "--out", str(run), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rank_pid(agent: int, rank: int) -> int:
    """The training process of ``rank``: a child of the torchrun agent whose environment says RANK=rank."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(p.name)
    raise AssertionError(f"no process of rank {rank} under torchrun {agent}")


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        pointer = run / "checkpoints" / "latest"
        if pointer.is_file() and int(pointer.read_text().strip()[5:]) >= step:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_a_rank_killed_mid_step_stops_the_others_within_a_minute(tmp_path, data_cache):
    recipe = _recipe(tmp_path / "r.yaml", data_cache, steps=100000, checkpoint_every=3, lost_rank_s=10)
    run = tmp_path / "run"
    proc = _torchrun(recipe, run)
    _wait_for_step(run, 6, proc)
    time.sleep(0.37)  # somewhere inside a step
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    out, err = proc.communicate(timeout=120)
    waited = time.monotonic() - killed
    assert proc.returncode != 0
    assert waited < 60, f"the surviving rank took {waited:.0f} s to stop"
    assert "contrast: error: lost rank 1 of 2" in err, err[-3000:]
    assert "--resume latest" in err
    ckpt = R.resolve(run)  # the last complete checkpoint loads, with its training state
    R.load_model(run)
    assert C.load_state(ckpt)["step"] >= 6
    summary = [json.loads(ln)["summary"] for ln in (run / "metrics.jsonl").read_text().splitlines()
               if ln.strip() and "summary" in json.loads(ln)]
    assert summary and summary[-1]["status"].startswith("stopped: lost rank 1")


def test_two_processes_evaluate_during_and_after_training_and_exit_cleanly(tmp_path, data_cache):
    recipe = _recipe(tmp_path / "r.yaml", data_cache, steps=4, checkpoint_every=0, eval_every=2)
    data = yaml.safe_load(recipe.read_text())
    data["eval"] = {"tasks": [str(Path("eval/tasks/colours.yaml").resolve())], "retrieval_split": "val"}
    recipe.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    proc = _torchrun(recipe, run)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "Connection closed" not in err
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in rows if "eval" in r] == [2, 4]  # once per evaluation: the main process writes
    assert "zeroshot/colours/top1" in out  # the end-of-run metrics are printed once
    assert out.count("evaluation at the end") == 1
