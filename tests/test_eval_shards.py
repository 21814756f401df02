"""Evaluation from webdataset shards: retrieval on the val shards of a shard folder written by `contrast data shard`,
during training and from `contrast eval`, streamed (only embeddings kept), equal to the same evaluation on the source
the shards came from; a flat folder of shards (img2dataset's layout) indexed whole."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch
from conftest import tiny_config

from contrast import runs as R
from contrast.cli import main
from contrast.config import ConfigError, DataConfig
from contrast.data import DataError, load_source
from contrast.data.decode import SampleReader
from contrast.data.shard import write_shards
from contrast.evaluate.retrieval import evaluate_retrieval, evaluate_retrieval_stream
from contrast.train.loop import train

SPLIT_SIZES = {"train": 96, "val": 24, "test": 16}


def _data_config(data_cache):
    cfg = tiny_config(data_cache)
    s = cfg.data.synthetic
    s.train_size, s.val_size, s.test_size = SPLIT_SIZES["train"], SPLIT_SIZES["val"], SPLIT_SIZES["test"]
    return cfg


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_cache):
    """The built-in set's three splits as `contrast data shard` writes them (16 px images, 10 samples a shard)."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    cfg = _data_config(data_cache)
    for split in SPLIT_SIZES:
        write_shards(cfg.data, out / split, split=split, shard_size=10, image_size=16)
    return out


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory, shards, data_cache):
    """A run trained from the shards, evaluating retrieval on their val shards at steps 2 and 4."""
    cfg = _data_config(data_cache)
    cfg.data.source = str(shards)
    cfg.train.steps, cfg.train.eval_every, cfg.train.batch_size = 4, 2, 8
    cfg.eval.retrieval_split, cfg.eval.retrieval_limit = "val", 20
    cfg.train.best_metric = "retrieval/text_to_image/R@5"
    run = tmp_path_factory.mktemp("shard_run") / "run"
    train(cfg, run, progress=False)
    return run


def _evaluations(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["eval"] for r in rows if "eval" in r}


def _reference(run, data_cache, limit):
    """Map-style retrieval on the val split of the source the shards came from (the same images and captions)."""
    model, preprocess, tokenizer = R.load(run)
    ds = load_source(_data_config(data_cache).data, "val", 16)
    return evaluate_retrieval(model, preprocess, tokenizer, ds.select(range(limit)), batch_size=7)


def test_a_run_from_shards_evaluates_retrieval_on_its_val_shards(shard_run, data_cache):
    evals = _evaluations(shard_run)
    assert sorted(evals) == [2, 4]
    ref = _reference(shard_run, data_cache, limit=20)
    assert ref["num_images"] == 20
    for d in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert evals[4][f"retrieval/{d}/R@{k}"] == pytest.approx(ref[d][f"R@{k}"], abs=1e-6)


def test_contrast_eval_retrieval_reads_the_val_shards(shard_run, shards, data_cache, tmp_path, capsys):
    assert main(["eval", "retrieval", "--checkpoint", str(shard_run), "--data", str(shards), "--split", "val",
                 "--device", "cpu", "--out-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    ref = _reference(shard_run, data_cache, limit=SPLIT_SIZES["val"])
    assert f"{SPLIT_SIZES['val']} images, {SPLIT_SIZES['val']} captions" in out
    r1 = float(out.split("text_to_image: R@1 ")[1].split()[0])
    assert r1 == pytest.approx(ref["text_to_image"]["R@1"], abs=1e-3)


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_streamed_retrieval_skips_and_counts_bad_samples_and_stops_at_the_limit(shard_run, shards, tmp_path):
    """A sample with an unreadable image and one with an empty caption are left out and counted as map-style
    retrieval counts them; reading stops once ``limit`` usable pairs are in."""
    from contrast.data.units import TarUnit

    good = [TarUnit(str(p)) for p in sorted((shards / "val").glob("*.tar"))]
    rows = list(good[0].rows(0, 1))[:4]
    bad = tmp_path / "bad.tar"
    _tar(bad, [("a", {"png": b"not an image", "txt": b"a red circle"}), ("b", {"png": rows[0]["image"], "txt": b""})])
    model, preprocess, tokenizer = R.load(shard_run)
    reader = SampleReader()
    r = evaluate_retrieval_stream(model, preprocess, tokenizer, [*TarUnit(str(bad)).rows(0, 1), *rows], reader=reader)
    assert r["num_images"] == 4 and r["num_texts"] == 4
    assert sum(r["skipped"].values()) == 2 and len(r["skipped"]) == 2

    consumed = []

    def counted():
        for unit in good:
            for row in unit.rows(0, 1):
                consumed.append(row["__key__"])
                yield row

    r = evaluate_retrieval_stream(model, preprocess, tokenizer, counted(), limit=5)
    assert r["num_images"] == 5 and len(consumed) == 5


def test_a_flat_folder_of_shards_is_indexed_whole(shard_run, shards, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    tars = [p for split in SPLIT_SIZES for p in sorted((shards / split).glob("*.tar"))]
    for n, p in enumerate(tars):
        shutil.copy(p, flat / f"{n:05d}.tar")  # img2dataset's layout: NNNNN.tar, no split folders
    common = ["--checkpoint", str(shard_run), "--device", "cpu", "--workers", "0", "--no-progress"]
    assert main(["index", "build", "--data", str(flat), "--out", str(tmp_path / "ix"), *common]) == 0
    out = capsys.readouterr().out
    assert f"{sum(SPLIT_SIZES.values())} image vectors" in out
    assert main(["index", "eval", str(tmp_path / "ix"), "--queries", "image", "--device", "cpu"]) == 2
    assert "--queries text" in capsys.readouterr().err  # no held-out images in a collection without splits
    assert main(["index", "eval", str(tmp_path / "ix"), "--queries", "text", "-k", "1", "10", "--device", "cpu"]) == 0
    assert "text->image" in capsys.readouterr().out
    assert main(["index", "build", "--data", str(flat), "--split", "test", "--out", str(tmp_path / "ix2"), *common]) == 2
    err = capsys.readouterr().err
    assert "--split all" in err and "Traceback" not in err
    with pytest.raises(DataError, match="--split all"):
        load_source(DataConfig(source=str(flat)), "val")


def test_zero_shot_tasks_read_shards_as_a_stream(shard_run, shards, data_cache, tmp_path, capsys):
    """A zero-shot task on the test shards (labels and where: from each sample's .json) gives what the same task on
    the source the shards came from gives, during training (the evaluator) and from contrast eval zeroshot."""
    import yaml

    from contrast.evaluate.wds import ShardRows
    from contrast.evaluate.zeroshot import evaluate_zeroshot, load_task, task_rows
    from contrast.train.evals import Evaluator

    task = yaml.safe_load(open("eval/tasks/shapes.yaml"))
    on_shards = tmp_path / "shapes_shards.yaml"
    on_shards.write_text(yaml.safe_dump({**task, "name": "shapes_shards", "data": str(shards)}))
    model, preprocess, tokenizer = R.load(shard_run)
    cfg = _data_config(data_cache)
    ref = evaluate_zeroshot(model, preprocess, tokenizer, load_task("eval/tasks/shapes.yaml"), data_cfg=cfg.data,
                            image_size=16)
    streamed = task_rows(load_task(on_shards), cfg.data, 16)
    assert isinstance(streamed, ShardRows)
    got = evaluate_zeroshot(model, preprocess, tokenizer, load_task(on_shards), data_cfg=cfg.data, image_size=16)
    assert got["n"] == ref["n"] > 0
    assert got["confusion"] == ref["confusion"] and got["top1"] == ref["top1"]
    cfg.eval.tasks = [str(on_shards)]
    metrics = Evaluator(cfg, model, torch.device("cpu"))(model)
    assert metrics["zeroshot/shapes_shards/top1"] == pytest.approx(ref["top1"])
    assert main(["eval", "zeroshot", "--checkpoint", str(shard_run), "--task", str(on_shards), "--device", "cpu",
                 "--out-dir", str(tmp_path / "z")]) == 0
    assert f"top-1 {ref['top1']:.3f}" in capsys.readouterr().out
    bad = tmp_path / "bad_label.yaml"
    bad.write_text(yaml.safe_dump({**task, "data": str(shards), "label_column": "shapes"}))
    with pytest.raises(ConfigError, match="has no label 'shapes'.*set label_column to one of its fields"):
        task_rows(load_task(bad), cfg.data, 16)


def test_the_linear_probe_reads_a_task_on_shards(shard_run, shards, data_cache, tmp_path, capsys):
    """The linear probe on a task over the shards (train / val / test shards, labels and where: from .json) equals
    the probe on the same task over the source the shards came from; contrast eval linear-probe runs it."""
    import dataclasses

    import yaml

    from contrast.evaluate.linear_probe import evaluate_linear_probe
    from contrast.evaluate.zeroshot import load_task, task_dataset

    task = yaml.safe_load(open("eval/tasks/shapes.yaml"))
    on_shards = tmp_path / "shards.yaml"
    on_shards.write_text(yaml.safe_dump({**task, "name": "shards", "data": str(shards)}))
    model, preprocess, _ = R.load(shard_run)
    cfg = _data_config(data_cache)
    got = {}
    for name, t in (("source", load_task("eval/tasks/shapes.yaml")), ("shards", load_task(on_shards))):
        splits = [task_dataset(dataclasses.replace(t, split=s), cfg.data, 16) for s in ("train", "test", "val")]
        got[name] = evaluate_linear_probe(model, preprocess, *splits, label_column="shape", classnames=t.classnames,
                                          l2_grid=[1e-2, 1.0])
    for key in ("num_train", "num_val", "num_test", "test_accuracy", "best_l2"):
        assert got["shards"][key] == got["source"][key], key
    assert got["shards"]["num_train"] > 0
    assert main(["eval", "linear-probe", "--checkpoint", str(shard_run), "--task", str(on_shards), "--device", "cpu",
                 "--l2", "0.01", "1", "--out-dir", str(tmp_path / "probe")]) == 0
    assert f"linear probe test accuracy {got['source']['test_accuracy']:.3f}" in capsys.readouterr().out
