"""Sample streams: order as a pure function of (seed, epoch, position), exact cursors, mixtures, flat memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from contrast.data.stream import MapStream, MixStream, Permutation, ShardStream


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    p = Permutation(n, seed=11)
    assert sorted(p(i) for i in range(n)) == list(range(n))


def test_permutations_differ_by_seed_and_look_shuffled():
    a = [Permutation(1000, 1)(i) for i in range(1000)]
    b = [Permutation(1000, 2)(i) for i in range(1000)]
    assert a != b
    assert sum(x == i for i, x in enumerate(a)) < 20  # an identity-like order would leave many fixed points
    # neighbours land far apart on average (a shuffled order of 0..999 has mean |gap| about 333)
    gaps = [abs(a[i + 1] - a[i]) for i in range(999)]
    assert 250 < sum(gaps) / len(gaps) < 420


def _epoch_items(stream, n_items):
    return [stream.next()["i"] for _ in range(n_items)]


class Rows:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i}


def test_map_streams_give_the_same_global_batches_for_any_layout():
    """Stream g = local x world + rank; step s is block k = s // per_rank of local stream s % per_rank. The global
    batch of every step (ranks concatenated) equals one process's batch of world x B, for any workers."""
    n = 103

    def global_batches(world, per_rank, steps, B):
        S = world * per_rank
        streams = [[MapStream(Rows(n), 5, local * world + r, S, B, B * world) for r in range(world)]
                   for local in range(per_rank)]
        out = []
        for step in range(steps):
            ranks = streams[step % per_rank]
            out.append([s.next()["i"] for s in ranks for _ in range(B)])
        return out

    one = global_batches(1, 1, 30, 8)
    assert global_batches(1, 3, 30, 8) == one
    assert global_batches(2, 2, 30, 4) == one
    assert global_batches(4, 1, 30, 2) == one
    assert global_batches(2, 1, 30, 8) != one  # another global batch size is another order
    flat_one = [i for b in one for i in b]
    epoch_len = (n // 8) * 8  # 96 of 103 rows, whole global batches of 8
    assert sorted(flat_one[:epoch_len]) == sorted(set(flat_one[:epoch_len]))  # no repeats within an epoch
    assert flat_one[:epoch_len] != flat_one[epoch_len : 2 * epoch_len]  # a new permutation per epoch


def test_map_stream_restore_and_rebase_continue_exactly():
    a = MapStream(Rows(50), seed=3, g=1, S=3, block=4, global_batch=12)
    [a.next() for _ in range(40)]
    state = a.state()
    rest = [a.next()["i"] for _ in range(30)]
    b = MapStream(Rows(50), seed=3, g=1, S=3, block=4, global_batch=12)
    b.restore(state)
    assert [b.next()["i"] for _ in range(30)] == rest
    # a 1 x 1 layout at step 7 continues exactly where a 2 x 2 layout of the same global batch stood at step 7
    world, per_rank, B = 2, 2, 3
    steps_done = 7
    olds = []
    for local in range(per_rank):
        for r in range(world):
            s = MapStream(Rows(60), 1, local * world + r, 4, B, B * world)
            s.steps = (per_rank, local)
            s.taken = len([k for k in range(steps_done) if k % per_rank == local]) * B
            olds.append(s)
    new = MapStream(Rows(60), 1, 0, 1, B * world, B * world)
    new.steps = (1, 0)
    new.rebase([o.state() for o in olds], steps_done)
    ref = MapStream(Rows(60), 1, 0, 1, B * world, B * world)
    [ref.next() for _ in range(steps_done * B * world)]
    assert [new.next()["i"] for _ in range(12)] == [ref.next()["i"] for _ in range(12)]


def test_map_stream_replacement_is_a_function_of_the_slot():
    a = MapStream(Rows(40), 2, 0, 1, 8, 8)
    b = MapStream(Rows(40), 2, 0, 2, 4, 8)
    row = a.next()
    assert b.next() == row
    assert [a.replace(row, t)["i"] for t in range(3)] == [b.replace(row, t)["i"] for t in range(3)]


class ListUnit:
    def __init__(self, name, items):
        self.name, self.items = name, items

    def rows(self, part, parts):
        for n, x in enumerate(self.items):
            if n % parts == part:
                yield {"i": x}


def _units(n_units, per_unit):
    return [ListUnit(f"u{u}", list(range(u * per_unit, (u + 1) * per_unit))) for u in range(n_units)]


@pytest.mark.parametrize("n_units,S", [(6, 2), (5, 3), (2, 5)])
def test_shard_streams_cover_each_epoch_once(n_units, S):
    units, per_unit = _units(n_units, 10), 10
    parts = -(-S // n_units)
    total = n_units * per_unit
    seen = []
    for g in range(S):
        s = ShardStream(units, seed=1, g=g, S=S, buffer=4)
        while True:
            before = s.state()
            row = s.next()
            if s.state()[0] == 1:
                break
            seen.append(row["i"])
            assert before[0] == 0
    assert sorted(seen) == list(range(total)), (parts, Counter(seen).most_common(2))


def test_shard_stream_shuffles_within_units_and_restores_mid_unit():
    units = _units(4, 25)
    a = ShardStream(units, seed=9, g=0, S=1, buffer=8)
    head = [a.next()["i"] for _ in range(37)]  # stops inside the second unit
    state = a.state()
    assert state[2] not in (0, 25)
    tail = [a.next()["i"] for _ in range(80)]
    b = ShardStream(units, seed=9, g=0, S=1, buffer=8)
    b.restore(state)
    assert [b.next()["i"] for _ in range(80)] == tail
    assert head[:25] != sorted(head[:25])  # the buffer shuffled the first unit


def test_mixture_proportions_follow_weights_and_restore():
    def mix():
        return MixStream([MapStream(Rows(1000), 1, 0, 1, 1, 1), MapStream(Rows(10), 2, 0, 1, 1, 1)], [0.7, 0.3],
                         seed=4, g=0)

    m = mix()
    draws = [m.next()["__source__"] for _ in range(20000)]
    share = draws.count(0) / len(draws)
    assert abs(share - 0.7) < 0.015  # binomial sd is 0.0032
    state = m.state()
    tail = [(r["__source__"], r["i"]) for r in (m.next() for _ in range(200))]
    m2 = mix()
    m2.restore(state)
    assert [(r["__source__"], r["i"]) for r in (m2.next() for _ in range(200))] == tail


def test_rebase_restarts_the_earliest_epoch():
    s = MapStream(Rows(20), 0, 1, 2, 5, 10)  # epochs of 20 rows = 4 blocks; this stream takes the odd blocks
    s.rebase([[30, 3], [20, 2], [41, 4]], None)  # saved streams were in epochs 3, 2 and 4: restart epoch 2
    assert s.taken == 4 * 5 and s._position(s.taken) == 2 * 20 + 5  # block 9: the second of epoch 2
    s2 = MapStream(Rows(20), 0, 0, 1, 5, 5)
    s2.rebase([[0, 0]], None)
    assert s2.state() == [0, 0]


def test_a_billion_row_source_starts_in_bounded_memory(tmp_path):
    """The loader over a virtual 1,000,000,000-row source yields its first batches without growing with the rows:
    measured as the process's peak RSS after three batches, minus the peak after imports (a per-epoch index tensor
    alone would be 8 GB)."""
    code = textwrap.dedent("""
        import resource, torch
        from contrast.data.batches import StreamLoader, StreamSpec
        from contrast.data.stream import MapStream

        class Virtual:
            def __len__(self): return 1_000_000_000
            def __getitem__(self, i): return {"x": float(i % 97), "__index__": i}

        def prepare(row, rng): return {"x": row["x"] + rng.random(), "i": row["__index__"]}
        def collate(s): return {"x": torch.tensor([r["x"] for r in s]), "input_ids": torch.tensor([r["i"] for r in s])}
        rows = Virtual()
        spec = StreamSpec(lambda g, S: MapStream(rows, 0, g, S, 256, 2048), prepare, collate, batch_size=256, seed=0,
                          rank=1, world=8, per_rank=1)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        it = iter(StreamLoader(spec, num_workers=0))
        batches = [next(it) for _ in range(3)]
        assert all(b["input_ids"].shape == (256,) for b in batches)
        assert len({int(i) for b in batches for i in b["input_ids"]}) == 768
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mib = float(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 64, f"the loader grew the process by {grown_mib:.0f} MiB"
