"""Retrieval indexes at scale, tested small: held-out-query recall against brute force, refine, on-disk lists,
incremental adds, killed on-disk builds and additions, the automatic factory choice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from contrast.index import (
    IndexStoreError,
    add_to_index,
    build_index,
    choose_factory,
    evaluate_queries,
    open_index,
)
from contrast.index.factory import GIB, OPTIONS

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # faiss results depend on threading


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int = 0, noise: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(clusters, dim)))
    return unit(centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)))


def text_like(x: np.ndarray, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Queries off the indexed vectors' manifold, as a caption is from its image (a shared offset, the modality gap,
    plus noise); returns (queries, the row each was made from)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), n, replace=False)
    gap = unit(rng.normal(size=(1, x.shape[1])))
    return unit(x[rows] + 0.8 * gap + 0.3 * rng.normal(size=(n, x.shape[1])) / np.sqrt(x.shape[1]) * 4), rows


def stack(batch):
    return np.stack(batch)


def brute_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1, kind="stable")[:, :k]


def test_held_out_query_recall_and_hits_equal_brute_force(tmp_path):
    x = clustered(3000, 32, 30, seed=2)
    q, truth = text_like(x, 120)
    index = build_index(x, stack, tmp_path, factory="IVF64,Flat", shard_size=700, progress=False)
    ev = evaluate_queries(index, q, direction="text->image", truth=truth, ks=(1, 10, 100), nprobe=2)
    exact = brute_topk(x, q, 100)
    got = faiss.read_index(str(tmp_path / "index.faiss"))
    faiss.extract_index_ivf(got).nprobe = 2
    rows = got.search(q, 100)[1]  # (120, 100) by faiss directly
    for k in (1, 10, 100):
        want = np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows, exact)])
        assert ev.recall[k] == pytest.approx(want, abs=1e-12)
        assert ev.hit[k] == pytest.approx(np.mean([t in r[:k] for t, r in zip(truth, rows)]), abs=1e-12)
        assert ev.exact_hit[k] == pytest.approx(np.mean([t in r[:k] for t, r in zip(truth, exact)]), abs=1e-12)
    assert ev.recall[10] < 1.0  # nprobe=2 of 64 lists misses some: the number above is not trivially 1
    assert ev.search["nprobe"] == 2 and ev.count == 3000 and ev.qps > 0 and ev.exact_qps > 0
    flat = evaluate_queries(build_index(x, stack, tmp_path / "flat", progress=False), q, truth=truth)
    assert flat.recall == {1: 1.0, 10: 1.0, 100: 1.0} and flat.hit == flat.exact_hit


def test_refine_improves_pq_recall_and_sq_costs_less_memory(tmp_path):
    x = clustered(3000, 64, 40, seed=3, noise=0.3)
    q, _ = text_like(x, 200, seed=4)
    got = {}
    for factory in ("IVF16,PQ8x4", "IVF16,PQ8x4,RFlat", "IVF16,PQ8x4,Refine(SQ8)", "IVF16,SQ8", "SQfp16", "Flat"):
        ix = build_index(x, stack, tmp_path / factory.replace(",", "_"), factory=factory, shard_size=1000,
                         progress=False)
        got[factory] = evaluate_queries(ix, q, ks=(10,), nprobe=16)
    pq = got["IVF16,PQ8x4"].recall[10]
    assert pq < 0.3  # 4-byte codes of 64-d vectors scramble the top 10
    assert got["IVF16,PQ8x4,RFlat"].recall[10] > pq + 0.2 and got["IVF16,PQ8x4,Refine(SQ8)"].recall[10] > pq + 0.2
    assert got["IVF16,PQ8x4,RFlat"].search["k_factor"] == 8
    assert got["IVF16,SQ8"].recall[10] > 0.95 and got["SQfp16"].recall[10] > 0.99
    flat = got["Flat"].bytes_per_vector
    assert flat == pytest.approx(4 * 64, rel=0.02)
    assert got["IVF16,SQ8"].bytes_per_vector < 0.3 * flat and got["SQfp16"].bytes_per_vector < 0.55 * flat
    assert got["IVF16,PQ8x4"].bytes_per_vector < 0.1 * flat
    # a shortlist of k (k_factor 1) re-ranks nothing: back to the PQ codes' recall
    ix = open_index(tmp_path / "IVF16_PQ8x4_RFlat")
    assert evaluate_queries(ix, q, ks=(10,), nprobe=16, k_factor=1).recall[10] == pytest.approx(pq)


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,SQ8", "PCAR32,IVF32,SQ8"])
def test_on_disk_index_gives_the_same_results_as_in_memory(tmp_path, factory):
    x = clustered(2500, 32, 20, seed=5)
    q, _ = text_like(x, 50, seed=6)
    mem = build_index(x, stack, tmp_path / "mem", factory=factory, shard_size=600, progress=False)
    disk = build_index(x, stack, tmp_path / "disk", factory=factory, on_disk=True, shard_size=600, add_chunk=250,
                       progress=False)
    assert disk.manifest.storage == "on_disk" and (tmp_path / "disk" / "lists_000.ivfdata").is_file()
    assert not list((tmp_path / "disk" / "blocks").iterdir())  # blocks are removed once merged
    assert disk.memory_bytes() < mem.memory_bytes() and disk.disk_bytes() > 0
    a, b = mem.search(q, 10, nprobe=4, with_metadata=False), open_index(tmp_path / "disk").search(q, 10, nprobe=4)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    moved = tmp_path / "moved"
    (tmp_path / "disk").rename(moved)  # the lists file is found beside index.faiss
    np.testing.assert_array_equal(open_index(moved).search(q, 10, nprobe=4).ids, a.ids)


def test_on_disk_needs_an_ivf_factory(tmp_path):
    with pytest.raises(IndexStoreError, match="cannot keep its inverted lists on disk"):
        build_index(clustered(100, 8, 3), stack, tmp_path, factory="HNSW32", on_disk=True, progress=False)


def described(x: np.ndarray, tag: str) -> list[dict]:
    return [{"vec": v, "caption": f"{tag}{i}"} for i, v in enumerate(x)]


def enc(batch):
    return np.stack([it["vec"] for it in batch])


def desc(it):
    return {"caption": it["caption"]}


def test_incremental_add_equals_building_at_once(tmp_path):
    x = clustered(900, 16, 8, seed=7)
    a, b, c = described(x[:500], "a"), described(x[500:800], "b"), described(x[800:], "c")
    kw = dict(shard_size=128, batch_size=50, describe=desc, progress=False)
    build_index(a + b + c, enc, tmp_path / "once", **kw)
    build_index(a, enc, tmp_path / "grown", **kw)
    add_to_index(tmp_path / "grown", b, enc, describe=desc, source="b", progress=False)
    grown = add_to_index(tmp_path / "grown", c, enc, describe=desc, source="c", progress=False)
    once = open_index(tmp_path / "once")
    assert faiss.serialize_index(once.index).tobytes() == faiss.serialize_index(grown.index).tobytes()
    assert (tmp_path / "once" / "ids.npy").read_bytes() == (tmp_path / "grown" / "ids.npy").read_bytes()
    meta_once = (tmp_path / "once" / "metadata.jsonl").read_text().splitlines()
    meta_grown = (tmp_path / "grown" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(m)["id"] for m in meta_grown] == list(range(900))
    assert [json.loads(m)["caption"] for m in meta_grown] == [json.loads(m)["caption"] for m in meta_once]
    m = grown.manifest
    assert (m.count, [(d["source"], d["first_id"], d["count"]) for d in m.additions]) == \
        (900, [("b", 500, 300), ("c", 800, 100)])
    q = x[[3, 600, 850]]
    assert grown.search(q, 1).ids[:, 0].tolist() == [3, 600, 850]
    assert grown.search(q, 1).metadata[1][0]["caption"] == "b100"
    # the same addition again does nothing (a rerun after it finished); another model is refused
    assert len(add_to_index(tmp_path / "grown", c, enc, describe=desc, source="c", progress=False)) == 900
    with pytest.raises(IndexStoreError, match="built by another model"):
        build_index(a, enc, tmp_path / "hashed", checkpoint_hash="aaaa", **kw)
        add_to_index(tmp_path / "hashed", b, enc, checkpoint_hash="bbbb", progress=False)


def test_incremental_add_on_disk_equals_the_trained_index_given_everything(tmp_path):
    x = clustered(2400, 32, 20, seed=8)
    build_index(x[:1600], stack, tmp_path / "ix", factory="IVF32,SQ8", on_disk=True, shard_size=500, progress=False)
    grown = add_to_index(tmp_path / "ix", x[1600:], stack, source="more", progress=False)
    assert sorted(p.name for p in (tmp_path / "ix").glob("lists_*")) == ["lists_001.ivfdata"]
    ref = faiss.read_index(str(tmp_path / "ix" / "trained.faiss"))  # the same quantizer, given all vectors at once
    ref.add(x)
    faiss.extract_index_ivf(ref).nprobe = 6
    q, _ = text_like(x, 40, seed=9)
    s, rows = ref.search(q, 10)
    res = open_index(tmp_path / "ix").search(q, 10, nprobe=6)
    np.testing.assert_array_equal(res.rows, rows)
    np.testing.assert_allclose(res.scores, s, rtol=1e-6)
    assert len(grown) == 2400 and grown.manifest.additions[0]["first_id"] == 1600


KILL_SCRIPT = """
import sys, time, faiss, numpy as np
sys.path.insert(0, {repo!r})
faiss.omp_set_num_threads(1)
from contrast.index import add_to_index, build_index
rng = np.random.default_rng(5)
x = rng.normal(size=(1500, 16)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
mode, delay = {mode!r}, {delay}

def slow(batch):
    time.sleep(delay)
    return np.stack(batch)

if mode == "build":
    build_index(x[:1000], slow, {out!r}, factory="IVF16,Flat", on_disk=True, shard_size=64, batch_size=32,
                add_chunk=16, progress=False)
else:
    add_to_index({out!r}, x[1000:], slow, batch_size=32, source="more", progress=False)
"""


def run_script(out: Path, mode: str, delay: float) -> subprocess.Popen:
    code = textwrap.dedent(KILL_SCRIPT).format(repo=str(REPO), out=str(out), mode=mode, delay=delay)
    return subprocess.Popen([sys.executable, "-c", code])


def kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.time() + 60
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def same_search(a: Path, b: Path, x: np.ndarray) -> None:
    ia, ib = open_index(a), open_index(b)
    ra, rb = ia.search(x[:100], 10, nprobe=4), ib.search(x[:100], 10, nprobe=4)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.scores, rb.scores)
    assert (a / "ids.npy").read_bytes() == (b / "ids.npy").read_bytes()
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    assert ia.manifest.count == ib.manifest.count and ia.manifest.num_shards == ib.manifest.num_shards


def test_killed_on_disk_build_and_addition_resume_to_the_same_index(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    whole = tmp_path / "whole"
    assert run_script(whole, "build", 0.0).wait() == 0 and run_script(whole, "add", 0.0).wait() == 0

    killed = tmp_path / "killed"
    proc = run_script(killed, "build", 0.02)  # killed while encoding
    kill_when(proc, lambda: (killed / "shards" / "emb_00003.npy").exists())
    assert not (killed / "manifest.json").exists(), "the build finished before it could be killed"
    assert run_script(killed, "build", 0.0).wait() == 0
    proc = run_script(killed, "add", 0.02)  # killed mid-addition, after a shard of new vectors
    kill_when(proc, lambda: (killed / "shards" / "emb_00017.npy").exists())
    assert json.loads((killed / "manifest.json").read_text())["count"] == 1000
    assert (killed / "add.json").exists()
    assert run_script(killed, "add", 0.0).wait() == 0
    same_search(whole, killed, x)
    assert not (killed / "add.json").exists() and open_index(killed).manifest.additions[0]["count"] == 500


def test_automatic_choice_follows_size_memory_and_target():
    small = choose_factory(20_000, 512, memory_gib=4)
    assert small.factory == "Flat" and "exact search" in small.reason
    for memory, target in ((64, 0.9), (0.6, 0.9), (64, 0.99)):  # a hand search over the measured options
        fits = [o for o in OPTIONS if o.resident_bytes(1_000_000, 512) <= memory * GIB]
        good = [o for o in fits if o.recall >= target]
        want = max(good, key=lambda o: (o.speedup, not o.on_disk)) if good else max(fits, key=lambda o: o.recall)
        got = choose_factory(1_000_000, 512, memory_gib=memory, target_recall=target)
        assert (got.factory, got.on_disk, got.rerank) == (want.build(1_000_000, 512), want.on_disk, want.rerank)
        assert f"{want.recall:.3f}" in got.reason
    huge = choose_factory(1_000_000_000, 512, memory_gib=8, target_recall=0.9)
    assert huge.on_disk and "on disk" in huge.reason
    with pytest.raises(IndexStoreError, match="raise --memory"):
        choose_factory(100_000_000, 512, memory_gib=0.001)


def test_auto_factory_build_records_why(tmp_path):
    x = clustered(500, 16, 5)
    ix = build_index(x, stack, tmp_path, factory="auto", memory_gib=1, progress=False)
    assert ix.manifest.factory == "auto" and ix.manifest.factory_effective == "Flat"
    assert ix.manifest.notes[0].startswith("auto: 500 vectors")
    with pytest.raises(IndexStoreError, match="needs a memory budget"):
        build_index(x, stack, tmp_path / "b", factory="auto", progress=False)


def test_rerank_from_stored_shards_equals_exact_scoring_of_the_shortlist(tmp_path):
    x = clustered(3000, 64, 40, seed=3, noise=0.3)
    q, _ = text_like(x, 100, seed=4)
    ix = build_index(x, stack, tmp_path, factory="IVF16,PQ8x4fs", rerank=8, shard_size=700, progress=False)
    assert ix.manifest.rerank == 8
    raw = faiss.read_index(str(tmp_path / "index.faiss"))
    faiss.extract_index_ivf(raw).nprobe = 16
    _, cand = raw.search(q, 80)  # the shortlist, by faiss directly
    exact = np.sum(x[cand] * q[:, None, :], axis=2)  # (100, 80) exact scores of the shortlisted vectors
    order = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    res = ix.search(q, 10, nprobe=16)
    np.testing.assert_array_equal(res.rows, np.take_along_axis(cand, order, 1))
    np.testing.assert_allclose(res.scores, np.take_along_axis(exact, order, 1), rtol=1e-5)
    with_rerank = evaluate_queries(ix, q, ks=(10,), nprobe=16).recall[10]
    without = evaluate_queries(ix, q, ks=(10,), nprobe=16, rerank=0).recall[10]
    assert without < 0.5 < with_rerank and ix.memory_bytes() / len(ix) < 0.1 * 4 * 64


class Interrupt(Exception):
    pass


def test_build_interrupted_while_writing_blocks_resumes_to_the_same_index(tmp_path, monkeypatch):
    from contrast.index import ondisk

    x = clustered(1200, 16, 8, seed=10)
    kw = dict(factory="IVF16,SQ8", on_disk=True, shard_size=100, progress=False)
    whole = build_index(x, stack, tmp_path / "whole", **kw)
    real, calls, resuming = ondisk.atomic_write_index, [], False

    def failing(index, path):
        calls.append(path.name)
        if len(calls) == 5 and not resuming:
            raise Interrupt  # as if killed: four finished blocks stay behind
        real(index, path)

    monkeypatch.setattr(ondisk, "atomic_write_index", failing)
    with pytest.raises(Interrupt):
        build_index(x, stack, tmp_path / "cut", **kw)
    assert len(list((tmp_path / "cut" / "blocks").glob("block_*.faiss"))) == 4
    calls.clear()
    resuming = True
    resumed = build_index(x, stack, tmp_path / "cut", **kw)
    assert calls[0] == "block_00004.faiss" and len(calls) == 8  # the finished blocks were not written again
    q, _ = text_like(x, 30, seed=11)
    a, b = whole.search(q, 10, nprobe=3), resumed.search(q, 10, nprobe=3)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
