"""Indexes built from a trained run: held-out text / image queries against hand-computed references, additions
through the command line, decoding workers, webdataset shard sources, bf16 inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from contrast.index import open_index
from contrast.index.model import build_from_checkpoint, evaluate_from_checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_cache):
    from conftest import tiny_config

    from contrast.train.loop import train

    cfg = tiny_config(data_cache, steps=2)
    run = tmp_path_factory.mktemp("heldout_run") / "run"
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def reference(tiny_run):
    """Every test image and caption of the synthetic set encoded by the model directly, one batch each."""
    import contrast
    from contrast.data import load_source
    from contrast.runs import load_config_of

    model, preprocess, tokenizer = contrast.load(tiny_run)
    cfg, _ = load_config_of(tiny_run)
    ds = load_source(cfg.data, "test", cfg.model.image.image_size)
    with torch.no_grad():
        imgs = model.encode_image(torch.stack([preprocess(im) for im in ds["image"]])).numpy()  # (64, 32)
        txts = model.encode_text(tokenizer(list(ds["caption"]))).numpy()  # (64, 32)
    return imgs, txts, ds


def topk(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ base.astype(np.float64).T), axis=1, kind="stable")[:, :k]


def test_text_to_image_and_image_to_text_against_hand_computed_hits(tmp_path, tiny_run, reference):
    imgs, txts, _ = reference
    ix = build_from_checkpoint(tiny_run, "synthetic", tmp_path / "img", factory="Flat", shard_size=20, progress=False)
    (ev,) = evaluate_from_checkpoint(ix, queries=["text"], ks=(1, 5, 20))
    assert ev.direction == "text->image" and ev.num_queries == 64
    assert ev.recall == {1: 1.0, 5: 1.0, 20: 1.0}  # Flat is exact search
    ranked = topk(imgs, txts, 20)  # each caption's own image is the ground truth
    for k in (1, 5, 20):
        assert ev.hit[k] == pytest.approx(np.mean([i in ranked[i, :k] for i in range(64)]), abs=1e-9)
    assert 0 < ev.hit[1] < ev.hit[20] < 1.0  # a two-step model: not every caption finds its image first

    cap = build_from_checkpoint(tiny_run, "synthetic", tmp_path / "cap", modality="text", shard_size=20,
                                progress=False)
    (ev,) = evaluate_from_checkpoint(cap, queries=["image"], ks=(1, 5))
    ranked = topk(txts, imgs, 5)
    assert ev.direction == "image->text" and ev.recall[5] == 1.0
    assert ev.hit[5] == pytest.approx(np.mean([i in ranked[i, :5] for i in range(64)]), abs=1e-9)


def test_image_queries_of_another_split_on_an_ivf_index(tmp_path, tiny_run, data_cache):
    import contrast
    from contrast.data import load_source
    from contrast.runs import load_config_of

    ix = build_from_checkpoint(tiny_run, "synthetic", tmp_path / "ix", split="train", factory="IVF1024,Flat",
                               shard_size=100, progress=False)
    assert ix.manifest.factory_effective == "IVF6,Flat"  # 256 rows // 39
    (ev,) = evaluate_from_checkpoint(ix, queries=["image"], ks=(10,), nprobe=1)
    assert ev.direction == "image->image" and ev.num_queries == 32 and ev.hit is None  # the val split's images
    model, preprocess, _ = contrast.load(tiny_run)
    cfg, _ = load_config_of(tiny_run)
    val = load_source(cfg.data, "val", cfg.model.image.image_size)
    train = np.concatenate(list(ix.shards()))
    with torch.no_grad():
        q = model.encode_image(torch.stack([preprocess(im) for im in val["image"]])).numpy()
    exact = topk(train, q, 10)
    got = ix.search(q, 10, nprobe=1).rows
    assert ev.recall[10] == pytest.approx(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]), abs=1e-9)
    assert ev.recall[10] < 1.0  # one list of six probed


def test_cli_add_then_eval_and_rerun(tmp_path, tiny_run, reference, capfd):  # fd-level: faiss prints there
    from contrast.cli import main

    ix = tmp_path / "ix"
    assert main(["index", "build", "--checkpoint", str(tiny_run), "--data", "synthetic", "--out", str(ix),
                 "--factory", "IVF1024,SQ8", "--on-disk", "--shard-size", "40", "--workers", "0",
                 "--no-progress"]) == 0
    assert main(["index", "add", str(ix), "--checkpoint", str(tiny_run), "--data", "synthetic", "--split", "val",
                 "--workers", "0", "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert "32 vectors added (ids 64..95), 96 in all" in out
    m = open_index(ix).manifest
    assert (m.count, m.storage, m.additions[0]["split"], m.additions[0]["first_id"]) == (96, "on_disk", "val", 64)
    assert main(["index", "add", str(ix), "--checkpoint", str(tiny_run), "--data", "synthetic", "--split", "val",
                 "--workers", "0", "--no-progress"]) == 0
    assert "was added to" in capfd.readouterr().out and len(open_index(ix)) == 96
    res = open_index(ix).search(open_index(ix).vectors([70]), 1, nprobe=1)
    assert res.ids[0, 0] == 70 and res.metadata[0][0]["path"] == "synthetic:val[6]"
    assert main(["index", "eval", str(ix), "--queries", "text", "stored", "-k", "1", "10", "--json"]) == 0
    doc = json.loads(capfd.readouterr().out)
    assert [r["direction"] for r in doc["results"]] == ["text->image", "stored->image"]
    assert doc["results"][0]["num_queries"] == 64  # captions of the build's own rows, not of the addition
    assert doc["bytes_per_vector"] < doc["flat_bytes_per_vector"] and doc["disk_bytes"] > 0


def test_workers_and_shards_give_the_same_index(tmp_path, tiny_run, data_cache):
    from contrast.data.shard import write_shards
    from contrast.runs import load_config_of

    a = build_from_checkpoint(tiny_run, "synthetic", tmp_path / "a", shard_size=24, workers=0, progress=False)
    b = build_from_checkpoint(tiny_run, "synthetic", tmp_path / "b", shard_size=24, workers=2, progress=False)
    for name in ("ids.npy", "metadata.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    np.testing.assert_array_equal(np.concatenate(list(a.shards())), np.concatenate(list(b.shards())))

    cfg, _ = load_config_of(tiny_run)
    write_shards(cfg.data, tmp_path / "wds" / "test", split="test", shard_size=10,
                 image_size=cfg.model.image.image_size)
    c = build_from_checkpoint(tiny_run, str(tmp_path / "wds"), tmp_path / "c", shard_size=24, workers=2,
                              progress=False)
    assert len(c) == 64 and c.manifest.num_shards == 3
    np.testing.assert_allclose(np.concatenate(list(c.shards())), np.concatenate(list(a.shards())), atol=1e-6)
    meta = [json.loads(line) for line in (tmp_path / "c" / "metadata.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [m["caption"] for m in meta] == [m["caption"] for m in ref]
    assert meta[12]["path"].endswith(".tar:000000012") and meta[12]["row"] == 12


def test_bf16_inference_stays_close_to_fp32(tmp_path, tiny_run):
    a = build_from_checkpoint(tiny_run, "synthetic", tmp_path / "a", workers=0, progress=False)
    b = build_from_checkpoint(tiny_run, "synthetic", tmp_path / "b", workers=0, precision="bf16", progress=False)
    va, vb = np.concatenate(list(a.shards())), np.concatenate(list(b.shards()))
    cos = np.sum(va * vb, axis=1)
    assert np.all(cos > 0.98) and not np.array_equal(va, vb)  # bf16 really ran, and stayed close
    from contrast.index import IndexStoreError

    with pytest.raises(IndexStoreError, match="fp16 inference needs a GPU"):
        build_from_checkpoint(tiny_run, "synthetic", tmp_path / "c", precision="fp16", progress=False)
