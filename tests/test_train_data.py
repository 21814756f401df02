"""Training data at scale: webdataset shards and parquet streamed with workers, exact mid-epoch resume after a
SIGKILL, mixtures, strict mode, and full batches on every rank when one rank meets corrupt images."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import tiny_model_dict
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 160), "orange": (240, 140, 20)}
SHAPES = ("square", "bar", "dot")


def sample(i: int) -> tuple[bytes, str]:
    """A small PNG of a coloured shape and its caption; varied enough that a CLIP learns a little."""
    name, rgb = list(COLOURS.items())[i % len(COLOURS)]
    shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    img = Image.new("RGB", (24, 24), (250, 250, 250))
    box = {"square": (4, 4, 20, 20), "bar": (2, 9, 22, 15), "dot": (9, 9, 15, 15)}[shape]
    img.paste(rgb, box)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), f"a {name} {shape}"


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, n_shards: int = 4, per_shard: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        items = []
        for j in range(per_shard):
            i = s * per_shard + j
            png, caption = sample(i)
            items.append((f"{i:06d}", {"png": png, "txt": caption.encode(), "json": json.dumps({"i": i}).encode()}))
        write_tar(folder / f"train-{s:05d}.tar", items)
    return folder


def recipe(path: Path, source, steps: int, **data) -> Path:
    cfg = {
        "model": tiny_model_dict("clip"),
        "data": {"source": source, "num_workers": 2, "shuffle_buffer": 10, **data},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 3,
                  "log_every": 1, "threads": 1, "device": "cpu", "seed": 3},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "summary" not in r}


def contrast_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "contrast", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


KILLER = """
import os, signal, sys
import contrast.train.loop as loop
from contrast.config import load_recipe

kill_at = int(sys.argv[3])
save = loop.C.save_checkpoint

def save_then_die(run_dir, step, *a, **k):
    out = save(run_dir, step, *a, **k)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers: workers are orphaned mid-prefetch
    return out

loop.C.save_checkpoint = save_then_die
loop.train(load_recipe(sys.argv[1]), sys.argv[2], progress=False)
"""


def test_shards_with_workers_resume_exactly_after_sigkill(tmp_path):
    """A run from tar shards with 2 DataLoader workers and augmentation is SIGKILLed right after its step-6
    checkpoint (mid-epoch: 96 rows, 8 per step, inside a shard's shuffle buffer); --resume latest logs the same
    losses for steps 7-10 as the uninterrupted run, bit for bit."""
    shards = make_shards(tmp_path / "shards")
    rec = recipe(tmp_path / "r.yaml", str(shards / "train-{00000..00003}.tar"), steps=10)
    full = contrast_cli("train", str(rec), "--out", str(tmp_path / "full"), "--no-progress")
    assert full.returncode == 0, full.stderr[-3000:]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, str(rec), str(tmp_path / "part"), "6"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    resumed = contrast_cli("train", str(rec), "--out", str(tmp_path / "part"), "--resume", "latest", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    assert len(set(a.values())) == 10  # the batches differ from step to step


def test_tar_rows_match_what_was_written(tmp_path):
    from contrast.data.units import TarUnit

    shards = make_shards(tmp_path / "s", n_shards=1, per_shard=5)
    rows = list(TarUnit(str(shards / "train-00000.tar")).rows(0, 1))
    assert [r["caption"] for r in rows] == [sample(i)[1] for i in range(5)]
    assert [r["image"] for r in rows] == [sample(i)[0] for i in range(5)]
    assert [r["json"]["i"] for r in rows] == list(range(5))
    assert [r["caption"] for r in TarUnit(str(shards / "train-00000.tar")).rows(1, 2)] == [sample(i)[1] for i in (1, 3)]


def test_damaged_shard_and_bad_samples_are_skipped_and_counted(tmp_path):
    """A truncated tar, a sample without an image, a corrupt PNG and an empty caption: training goes on with full
    batches and the summary counts them."""
    from contrast.config import load_recipe
    from contrast.train.loop import train

    shards = make_shards(tmp_path / "shards", n_shards=2, per_shard=20)
    png, _ = sample(0)
    write_tar(shards / "train-00002.tar", [("a", {"png": png[:40], "txt": b"a truncated image"}),
                                           ("b", {"txt": b"a caption without an image"}),
                                           ("c", {"png": png, "txt": b"   "})])
    data = (shards / "train-00000.tar").read_bytes()
    (shards / "train-00003.tar").write_bytes(data[: len(data) // 2])  # cut mid-member
    cfg = load_recipe(recipe(tmp_path / "r.yaml", str(shards), steps=12, num_workers=0))
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 12
    assert result.skipped.get("empty_caption", 0) >= 1
    assert sum(result.skipped.values()) >= 3


def test_parquet_is_streamed_by_split_without_a_cache(tmp_path):
    import datasets

    from contrast.config import DataConfig
    from contrast.data.sources import open_rows

    folder = tmp_path / "pq"
    folder.mkdir()
    for f in range(3):
        rows = [{"img": {"bytes": sample(i)[0], "path": None}, "text": sample(i)[1]} for i in range(f * 20, f * 20 + 20)]
        ds = datasets.Dataset.from_list(rows).cast_column("img", datasets.Image())
        ds.to_parquet(str(folder / f"part-{f}.parquet"))
    cfg = DataConfig(source=str(folder), image_column="img", caption_column="text", cache_dir=str(tmp_path / "cache"))
    got = {}
    for split in ("train", "val", "test"):
        src = open_rows(cfg, split, 16)
        assert src.rows is None and src.units
        got[split] = [r["caption"] for u in src.units for r in u.rows(0, 1)]
    everything = [sample(i)[1] for i in range(60)]
    assert got["train"] == everything[:54] and got["val"] == everything[54:57] and got["test"] == everything[57:]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.arrow"))


def test_mixture_trains_and_strict_mode_names_the_bad_sample(tmp_path):
    from contrast.config import load_recipe
    from contrast.data.sources import DataError
    from contrast.train.loop import train

    a = make_shards(tmp_path / "a", n_shards=2, per_shard=16)
    b = tmp_path / "b"
    b.mkdir()
    lines = []
    for i in range(40):
        png, caption = sample(i + 3)
        (b / f"{i}.png").write_bytes(png if i != 4 else b"not an image")
        lines.append(json.dumps({"file": f"{i}.png", "caption": caption}))
    (b / "captions.jsonl").write_text("\n".join(lines))
    mixture = [{"source": str(a), "weight": 3.0}, {"source": str(b), "weight": 1.0}]
    cfg = load_recipe(recipe(tmp_path / "r.yaml", "synthetic", steps=3, mixture=mixture))
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 3
    cfg = load_recipe(recipe(tmp_path / "s.yaml", str(b), steps=6, strict=True, num_workers=0))
    with pytest.raises(DataError, match=r"4\.png.*data\.strict"):
        train(cfg, tmp_path / "strict", progress=False)


def test_two_processes_with_corrupt_images_on_one_rank_match_one_process(tmp_path):
    """torchrun, 2 gloo processes x batch 8 (one worker each) vs one process x batch 16 (no workers), CLIP.

    Three corrupt images sit where rank 1 reads in the first step. What is compared holds by construction: a map
    source's global batch of each step is the same samples in the same order for any number of processes or workers
    (stream g = local x world + rank reads global block k x S + g), a bad sample is replaced by a row drawn from its
    global position, and augmentation is seeded by that position; with gathered features, ITC on 2 x 8 equals ITC
    on 16. So the per-step losses and the skip counts of both runs are equal. A rank that took a short batch would
    make the gloo all_gather fail, and a rank that skipped a step alone would hang it."""
    from contrast.config import load_recipe
    from contrast.data.stream import Permutation, mix
    from contrast.train.loop import train

    folder, n, seed = tmp_path / "imgs", 80, 3
    folder.mkdir()
    train_rows = n - 2 * (n // 20)  # 90 / 5 / 5
    perm = Permutation(train_rows, mix(seed, 0))
    corrupt = {perm(p) for p in (9, 12, 15)}  # global positions 8..15 of step 1 are rank 1's
    lines = []
    for i in range(n):
        png, caption = sample(i)
        (folder / f"{i}.png").write_bytes(png[: len(png) // 3] if i in corrupt else png)
        lines.append(json.dumps({"file": f"{i}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines))
    rec = recipe(tmp_path / "r.yaml", str(folder), steps=4, num_workers=1)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "contrast",
           "train", str(rec), "--out", str(tmp_path / "ddp"), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    single = train(load_recipe(rec, ["train.batch_size=16", "data.num_workers=0"]), tmp_path / "one", progress=False)
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == [1, 2, 3, 4]
    for step in ddp:
        assert ddp[step] == pytest.approx(one[step], rel=1e-4), (step, ddp[step], one[step])
    summary = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["skipped"] == single.skipped and sum(single.skipped.values()) >= 3
