"""Retrieval index: exactness of Flat, recall of IVF/HNSW against exact search, resume == uninterrupted, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import faiss
import numpy as np
import pytest

from contrast.index import (
    IndexStoreError,
    build_index,
    evaluate_index,
    exact_search,
    open_index,
    plan_factory,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # faiss results depend on threading


def clustered(n: int, dim: int, clusters: int, seed: int = 0, noise: float = 0.15) -> np.ndarray:
    """Unit vectors around ``clusters`` random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def stack(batch):
    return np.stack(batch)


def queries_near(x: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), n, replace=False)] + 0.1 * rng.normal(size=(n, x.shape[1]))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_flat_query_returns_exact_nearest_neighbours_with_metadata(tmp_path):
    x = clustered(1000, 32, 20)
    items = [{"vec": v, "path": f"/images/{i}.png", "caption": f"caption {i}"} for i, v in enumerate(x)]
    build_index(items, lambda b: np.stack([it["vec"] for it in b]), tmp_path, factory="Flat", shard_size=128,
                batch_size=50, describe=lambda it: {"path": it["path"], "caption": it["caption"]}, progress=False)
    index = open_index(tmp_path)
    q = queries_near(x, 16)
    res = index.search(q, k=5)
    sims = q.astype(np.float64) @ x.astype(np.float64).T  # (16, 1000)
    expected = np.argsort(-sims, axis=1)[:, :5]
    np.testing.assert_array_equal(res.ids, expected)
    np.testing.assert_allclose(res.scores, np.take_along_axis(sims, expected, 1), atol=1e-5)
    assert [m["caption"] for m in res.metadata[3]] == [f"caption {i}" for i in expected[3]]
    assert res.metadata[0][0]["path"] == f"/images/{expected[0, 0]}.png"
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert (m["count"], m["embed_dim"], m["metric"], m["factory"], m["num_shards"]) == \
        (1000, 32, "inner_product", "Flat", 8)
    ev = evaluate_index(index, k=10, num_queries=100)
    assert ev.recall == 1.0 and ev.qps > 0 and ev.exact_qps > 0


@pytest.mark.parametrize("factory, effective", [("IVF1024,Flat", "IVF76,Flat"), ("HNSW32", "HNSW32")])
def test_approximate_recall_at_10_against_exact(tmp_path, factory, effective):
    x = clustered(3000, 32, 30, seed=2)
    index = build_index(x, stack, tmp_path, factory=factory, shard_size=1000, progress=False)
    assert index.manifest.factory_effective == effective  # IVF lists clamped to 3000 // 39 = 76
    q = queries_near(x, 200, seed=3)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    got = open_index(tmp_path).search(q, k=10).ids
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
    assert recall > 0.9
    assert evaluate_index(index, k=10, num_queries=200).recall > 0.9
    # a stingier search is measurably worse, so recall above does depend on the search parameters
    stingy = index.search(q, k=10, nprobe=1, ef_search=10).ids
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(stingy, exact)]) < recall


def test_exact_search_over_shards_matches_full_sort():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(15, 6)).astype(np.float32)
    q = rng.normal(size=(4, 6)).astype(np.float32)
    scores, rows = exact_search([x[:5], x[5:12], x[12:]], q, k=7)
    full = q @ x.T
    np.testing.assert_array_equal(rows, np.argsort(-full, axis=1)[:, :7])
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :7], rtol=1e-6)


class Interrupt(Exception):
    pass


def assert_same_index(a: Path, b: Path):
    for name in ("ids.npy", "metadata.jsonl", "metadata_offsets.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    shards_a, shards_b = sorted((a / "shards").iterdir()), sorted((b / "shards").iterdir())
    assert [p.name for p in shards_a] == [p.name for p in shards_b]
    for pa, pb in zip(shards_a, shards_b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    ia, ib = faiss.read_index(str(a / "index.faiss")), faiss.read_index(str(b / "index.faiss"))
    assert ia.ntotal == ib.ntotal
    np.testing.assert_array_equal(faiss.serialize_index(ia), faiss.serialize_index(ib))
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    for key in ("count", "embed_dim", "factory_effective", "num_shards", "nprobe"):
        assert ma[key] == mb[key]


def test_interrupted_build_resumes_to_the_same_index(tmp_path):
    x = clustered(1000, 16, 10, seed=4)
    items = [{"vec": v, "caption": f"c{i}"} for i, v in enumerate(x)]
    kw = dict(factory="IVF1024,Flat", shard_size=128, batch_size=50, progress=False,
              describe=lambda it: {"caption": it["caption"]})
    build_index(items, lambda b: np.stack([it["vec"] for it in b]), tmp_path / "whole", **kw)

    calls = []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) == 7:  # shards are 50+50+28 items: two finished shards, then a failure mid-shard
            raise Interrupt
        return np.stack([it["vec"] for it in batch])

    with pytest.raises(Interrupt):
        build_index(items, flaky, tmp_path / "resumed", **kw)
    assert sorted(p.name for p in (tmp_path / "resumed" / "shards").glob("emb_*")) == ["emb_00000.npy",
                                                                                     "emb_00001.npy"]
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(IndexStoreError, match="unfinished build with other settings.*factory"):
        build_index(items, flaky, tmp_path / "resumed", **{**kw, "factory": "HNSW32"})

    seen = []

    def counting(batch):
        seen.extend(it["caption"] for it in batch)
        return np.stack([it["vec"] for it in batch])

    build_index(items, counting, tmp_path / "resumed", **kw)
    assert seen[0] == "c256" and len(seen) == 1000 - 256  # only the unfinished shards were encoded again
    assert_same_index(tmp_path / "whole", tmp_path / "resumed")


KILL_SCRIPT = """
import sys, time, faiss, numpy as np
sys.path.insert(0, {repo!r})
faiss.omp_set_num_threads(1)  # HNSW insertion order, hence the graph, depends on threading
from contrast.index import build_index
rng = np.random.default_rng(5)
x = rng.normal(size=(600, 16)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)

def slow(batch):
    time.sleep({delay})
    return np.stack(batch)

build_index(x, slow, {out!r}, factory="HNSW32", shard_size=64, batch_size=32, progress=False)
"""


def test_killed_build_resumes_to_the_same_index(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT).format(repo=str(REPO), out=str(whole),
                                                                              delay=0.0)], check=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT).format(
        repo=str(REPO), out=str(killed), delay=0.05)])
    deadline = time.time() + 60
    while not (killed / "shards" / "emb_00002.npy").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the build finished before it could be killed"
    (killed / "shards" / "emb_00009.npy.tmp1.npy").write_bytes(b"\x93NUMPY half a shard")  # as if killed mid-write
    build_index(x, stack, killed, factory="HNSW32", shard_size=64, batch_size=32, progress=False)
    assert_same_index(whole, killed)


def test_build_memory_is_bounded_by_the_shard_not_the_collection(tmp_path):
    x = clustered(12000, 64, 50, seed=6)  # 3 MB of vectors
    items = list(x)
    tracemalloc.start()
    build_index(items, stack, tmp_path, factory="Flat", shard_size=500, batch_size=125, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    shard_bytes = 500 * 64 * 4
    assert peak < 6 * shard_bytes < x.nbytes  # a few shards' worth of Python-side memory at most


def test_corrupt_manifest_and_missing_files_are_clear_errors(tmp_path):
    x = clustered(300, 16, 5)
    build_index(x, stack, tmp_path, shard_size=100, progress=False)
    good = (tmp_path / "manifest.json").read_text()
    open_index(tmp_path)

    (tmp_path / "manifest.json").write_text(good[: len(good) // 2])
    with pytest.raises(IndexStoreError, match="manifest.json is corrupt .*not valid JSON"):
        open_index(tmp_path)
    m = json.loads(good)
    del m["embed_dim"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexStoreError, match=r"missing keys \['embed_dim'\]"):
        open_index(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**json.loads(good), "count": "many"}))
    with pytest.raises(IndexStoreError, match="count should be int"):
        open_index(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**json.loads(good), "count": 299}))
    with pytest.raises(IndexStoreError, match="disagree with manifest"):
        open_index(tmp_path)
    (tmp_path / "manifest.json").write_text(good)

    blob = (tmp_path / "index.faiss").read_bytes()
    (tmp_path / "index.faiss").write_bytes(blob[:100])
    with pytest.raises(IndexStoreError, match="index.faiss cannot be read"):
        open_index(tmp_path)
    (tmp_path / "index.faiss").unlink()
    with pytest.raises(IndexStoreError, match="index.faiss is missing"):
        open_index(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(IndexStoreError, match="not a finished index: manifest.json is missing"):
        open_index(tmp_path)
    with pytest.raises(IndexStoreError, match="is not a directory"):
        open_index(tmp_path / "nope")


def test_other_model_is_refused(tmp_path):
    x = clustered(200, 16, 5)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights of model A")
    from contrast.index import file_sha256

    index = build_index(x, stack, tmp_path / "ix", checkpoint=str(weights), checkpoint_hash=file_sha256(weights),
                        progress=False)
    index.check_model(weights, embed_dim=16)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"weights of model B")
    with pytest.raises(IndexStoreError, match="built by another model"):
        index.check_model(other)
    with pytest.raises(IndexStoreError, match="16-wide vectors but the model embeds to 32"):
        index.check_model(weights, embed_dim=32)
    with pytest.raises(IndexStoreError, match="query vectors are 32 wide"):
        index.search(np.ones((1, 32), np.float32))


def test_factory_planning():
    assert plan_factory("IVF1024,PQ32", 256, 200_000) == ("IVF1024,PQ32", [])
    eff, notes = plan_factory("IVF1024,PQ32", 64, 10_000)
    assert eff == "IVF256,PQ32" and "clamped to IVF256" in notes[0]
    with pytest.raises(IndexStoreError, match=r"multiple of 32; use a PQ size that divides 48, e.g. PQ24"):
        plan_factory("IVF16,PQ32", 48, 10_000)
    with pytest.raises(IndexStoreError, match="at least 256 vectors"):
        plan_factory("PQ8", 64, 100)
    with pytest.raises(IndexStoreError, match="faiss cannot build factory 'Bogus'"):
        plan_factory("Bogus", 64, 100)


def test_encoder_contract_and_existing_index_are_checked(tmp_path):
    x = clustered(100, 8, 3)
    with pytest.raises(IndexStoreError, match="L2-normalised"):
        build_index(x, lambda b: 2 * np.stack(b), tmp_path / "a", progress=False)
    with pytest.raises(IndexStoreError, match=r"returned shape \(1, 8\) for a batch of 10"):
        build_index(x, lambda b: np.stack(b)[:1], tmp_path / "b", batch_size=10, progress=False)
    first = build_index(x, stack, tmp_path / "c", progress=False)
    # the same build again (a rerun after it finished, or after a kill between its last write and its exit): done
    assert build_index(x, stack, tmp_path / "c", progress=False).manifest == first.manifest
    with pytest.raises(IndexStoreError, match="already holds a finished index built with other settings"):
        build_index(x, stack, tmp_path / "c", factory="HNSW32", progress=False)
    again = build_index(x[:50], stack, tmp_path / "c", overwrite=True, progress=False)
    assert len(again) == 50 and len(open_index(tmp_path / "c")) == 50


# --------------------------------------------------------------------------------------------------- CLI, end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_cache):
    from conftest import tiny_config

    from contrast.train.loop import train

    cfg = tiny_config(data_cache, steps=2)
    run = tmp_path_factory.mktemp("index_run") / "run"
    train(cfg, run, progress=False)
    return run


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from contrast.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_build_query_eval_against_direct_model_encoding(tmp_path, tiny_run, capsys):
    import torch

    import contrast
    from contrast.data import load_source
    from contrast.runs import WEIGHTS, load_config_of, resolve, save_model_weights

    ix = tmp_path / "ix"
    code, out, _ = run_cli(capsys, "index", "build", "--checkpoint", str(tiny_run), "--data", "synthetic",
                           "--out", str(ix), "--shard-size", "24", "--batch-size", "10", "--no-progress")
    assert code == 0 and "64 image vectors x 32" in out
    m = json.loads((ix / "manifest.json").read_text())
    from contrast.index import file_sha256

    assert m["checkpoint_hash"] == file_sha256(resolve(tiny_run) / WEIGHTS) and m["num_shards"] == 3

    # independent reference: every test image encoded in one batch, cosine scores by hand
    model, preprocess, tokenizer = contrast.load(tiny_run)
    cfg, _ = load_config_of(tiny_run)
    ds = load_source(cfg.data, "test", cfg.model.image.image_size)
    with torch.no_grad():
        imgs = model.encode_image(torch.stack([preprocess(im) for im in ds["image"]]))  # (64, 32)
        txt = model.encode_text(tokenizer(["a red circle"]))  # (1, 32)
    sims = (txt @ imgs.T)[0].double().numpy()
    code, out, _ = run_cli(capsys, "index", "query", str(ix), "--text", "a red circle", "-k", "5", "--json")
    hits = json.loads(out)
    assert code == 0 and [h["id"] for h in hits] == np.argsort(-sims)[:5].tolist()
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(sims)[::-1][:5], atol=1e-5)
    assert [h["caption"] for h in hits] == [ds[h["id"]]["caption"] for h in hits]
    assert hits[0]["path"] == f"synthetic:test[{hits[0]['id']}]" and hits[0]["colour"] == ds[hits[0]["id"]]["colour"]

    ds[7]["image"].save(tmp_path / "query.png")
    code, out, _ = run_cli(capsys, "index", "query", str(ix), "--image", str(tmp_path / "query.png"), "--json")
    hits = json.loads(out)
    assert code == 0 and hits[0]["id"] == 7 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and len(hits) == 10

    code, out, _ = run_cli(capsys, "index", "eval", str(ix), "-k", "5", "--queries", "stored", "--json")
    stored = json.loads(out)["results"][0]
    assert code == 0 and stored["recall"]["5"] == 1.0 and stored["num_queries"] == 64

    # the same run directory with other weights: refused by hash
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    save_model_weights(model, resolve(other) / WEIGHTS)
    code, _, err = run_cli(capsys, "index", "query", str(ix), "--text", "a red circle", "--checkpoint", str(other))
    assert code == 2 and "was built by another model" in err

    (ix / "manifest.json").write_text("{ not json")
    code, _, err = run_cli(capsys, "index", "eval", str(ix))
    assert code == 2 and "manifest.json is corrupt" in err


def test_cli_text_modality_and_bad_input(tmp_path, tiny_run, capsys):
    from contrast.data import load_source
    from contrast.runs import load_config_of

    ix = tmp_path / "captions"
    code, _, _ = run_cli(capsys, "index", "build", "--checkpoint", str(tiny_run), "--data", "synthetic", "--out",
                         str(ix), "--modality", "text", "--factory", "HNSW32", "--no-progress")
    assert code == 0
    cfg, _ = load_config_of(tiny_run)
    caption = load_source(cfg.data, "test", cfg.model.image.image_size)[11]["caption"]
    code, out, _ = run_cli(capsys, "index", "query", str(ix), "--text", caption, "-k", "3", "--json")
    top = json.loads(out)[0]
    assert top["caption"] == caption and top["score"] == pytest.approx(1.0, abs=1e-4)

    code, _, err = run_cli(capsys, "index", "build", "--checkpoint", str(tiny_run), "--data", "synthetic", "--out",
                           str(ix), "--no-progress")
    assert code == 2 and "already holds a finished index" in err
    code, _, err = run_cli(capsys, "index", "build", "--checkpoint", str(tiny_run), "--data", "synthetic", "--out",
                           str(tmp_path / "pq"), "--factory", "IVF1024,PQ32", "--no-progress")
    assert code == 2 and "PQ codebooks need at least 256 vectors" in err
    (tmp_path / "notes.txt").write_text("not an image")
    code, _, err = run_cli(capsys, "index", "query", str(ix), "--image", str(tmp_path / "notes.txt"))
    assert code == 2 and "pass an image file" in err


def test_cli_folder_source_records_file_paths(tmp_path, tiny_run, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i in range(24):
        Image.new("RGB", (20, 20), (10 * i, 255 - 10 * i, (37 * i) % 256)).save(folder / f"img{i}.png")
        rows.append(json.dumps({"file": f"img{i}.png", "caption": f"patch {i}"}))
    (folder / "captions.jsonl").write_text("\n".join(rows))
    ix = tmp_path / "ix"
    code, out, _ = run_cli(capsys, "index", "build", "--checkpoint", str(tiny_run), "--data", str(folder),
                           "--split", "train", "--out", str(ix), "--no-progress")
    assert code == 0 and "22 image vectors" in out  # 24 rows: 22 train, 1 val, 1 test
    code, out, _ = run_cli(capsys, "index", "query", str(ix), "--image", str(folder / "img5.png"), "--json")
    top = json.loads(out)[0]
    assert (top["id"], top["path"], top["caption"]) == (5, str(folder / "img5.png"), "patch 5")
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
