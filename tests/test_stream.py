"""Sample streams: order as a pure function of (seed, epoch, position), exact cursors, mixtures, flat memory."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from contrast.data.stream import MapStream, MixStream, Permutation, ShardStream, StridedMapStream, mix


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
        spec = StreamSpec(lambda g, S, plans: MapStream(rows, 0, g, S, 256, 2048), prepare, collate, batch_size=256, seed=0,
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


def _ragged_units(sizes):
    out, at = [], 0
    for u, n in enumerate(sizes):
        out.append(ListUnit(f"u{u}", list(range(at, at + n))))
        at += n
    return out, at


def _relayout(make, old_S, old_plans, states, S):
    """The streams of a layout of S that continue what ``states`` (a layout of old_S) left, as a resume does."""
    plans = make(0, old_S, old_plans).remaining(states)
    streams = [make(g, S, plans) for g in range(S)]
    for s in streams:
        s.rebase(states, None)
    return streams, plans


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shard_streams_resumed_under_other_layouts_read_every_row_once_per_epoch(seed):
    """Seven units of 3..20 rows; layouts of 4, 3, 4, 1, 5 and 2 streams, each stream stopping after a random number
    of rows (so the saved cursors sit inside units and across epochs). Over the whole run, epochs 0 to 2 are read
    exactly once each, counted by row, and a restored stream continues exactly as the one it was saved from."""
    units, total = _ragged_units([3, 20, 11, 7, 16, 5, 14])

    def make(g, S, plans):
        return ShardStream(units, seed, g, S, buffer=4, plans=(plans or [None])[0])

    rng = random.Random(seed)
    seen, spans = [], []
    streams, plans, S = [make(g, 4, None) for g in range(4)], None, 4
    for new_S in (3, 4, 1, 5, 2):
        for s in streams:
            seen += [(r["__epoch__"], r["i"]) for r in (s.next() for _ in range(rng.randrange(45)))]
        states = [s.state() for s in streams]
        spans.append(max(st[0] for st in states) - min(st[0] for st in states))
        copy = make(0, S, plans)  # the same layout resumes stream 0 exactly (within its plans)
        copy.restore(states[0])
        more = [streams[0].next() for _ in range(30)]
        seen += [(r["__epoch__"], r["i"]) for r in more]
        assert [copy.next()["i"] for _ in range(30)] == [r["i"] for r in more]
        states[0] = streams[0].state()
        streams, plans = _relayout(make, S, plans, states, new_S)
        S = new_S
    for s in streams:
        while s.state()[0] < 3:
            row = s.next()
            seen.append((row["__epoch__"], row["i"]))
    assert max(spans) >= 1  # some layout change happened with streams in different epochs
    for e in range(3):
        got = sorted(i for ep, i in seen if ep == e)
        assert got == list(range(total)), (e, Counter(got).most_common(2), len(got))


def test_shard_streams_without_plans_read_units_g_plus_kS_of_each_epoch_permutation():
    """Without a change of layout there are no plans: stream g of S reads whole units at positions g, g + S, ... of
    the epoch's unit permutation (a function of (seed, epoch) alone), each unit's rows once, one unit after another;
    a stream restored from its cursor mid-unit goes on with the same rows."""
    sizes = [9, 4, 12, 6, 8]
    units, _ = _ragged_units(sizes)
    S = 2
    for g in range(S):
        s = ShardStream(units, 5, g, S, buffer=3)
        for e in range(2):
            perm = Permutation(len(units), mix(5, e))
            for pos in range(g, len(units), S):
                u = perm(pos)
                rows = [s.next() for _ in range(sizes[u])]
                assert sorted(r["i"] for r in rows) == units[u].items and {r["__epoch__"] for r in rows} == {e}
    a = ShardStream(units, 5, 1, S, buffer=3)
    [a.next() for _ in range(7)]
    b = ShardStream(units, 5, 1, S, buffer=3)
    b.restore(a.state())
    assert [b.next()["i"] for _ in range(30)] == [a.next()["i"] for _ in range(30)]


@pytest.mark.parametrize("second", ["shards", "map"])
def test_mixture_resumed_under_other_layouts_keeps_shares_and_reads_each_row_once(second):
    """Shards of 200 rows mixed with 90 rows (shards, or a map source read in strided shares), weights 0.7 / 0.3,
    layouts 4 -> 3 -> 4 streams with 2,000 draws in each: every completed epoch of each source is read exactly once,
    and the share of source 0 after each change of layout is 0.7 within 0.02 (binomial sd 0.006 over 4,000
    draws)."""
    a_units, a_total = _ragged_units([20] * 10)
    b_units, b_total = _ragged_units([15] * 6)

    def make(g, S, plans):
        plans = plans or [None, None]
        b = ShardStream(b_units, 12, g, S, 5, plans[1]) if second == "shards" else \
            StridedMapStream(Rows(b_total), 12, g, S, plans[1])
        return MixStream([ShardStream(a_units, 11, g, S, 5, plans[0]), b], [0.7, 0.3], seed=4, g=g)

    seen, after = [], []
    streams, plans, S = [make(g, 4, None) for g in range(4)], None, 4
    for stage, new_S in enumerate((3, 4, None)):
        for n, s in enumerate(streams):
            rows = [s.next() for _ in range(2000 // len(streams) + n)]
            seen += [(r["__source__"], r["__epoch__"], r["i"]) for r in rows]
            if stage:
                after += [r["__source__"] for r in rows]
        if new_S is None:
            break
        streams, plans = _relayout(make, S, plans, [s.state() for s in streams], new_S)
        S = new_S
    assert abs(after.count(0) / len(after) - 0.7) < 0.02
    last = [min(s.state()[1 + 3 * i] for s in streams) for i in range(2)]  # the epoch every stream of a source is in
    for source, total in ((0, a_total), (1, b_total)):
        assert last[source] >= 3
        for e in range(last[source]):
            got = sorted(i for src, ep, i in seen if src == source and ep == e)
            assert got == list(range(total)), (source, e, len(got))


def test_plans_round_trip_through_integers():
    from contrast.data.stream import Plan, decode_plans, encode_plans

    plans = [None, {3: Plan(2, [(5, 0), (1, 17)]), 4: Plan(1, [])}, {0: Plan(1, [(0, 3)])}]
    flat = encode_plans(plans)
    assert all(isinstance(x, int) for x in flat) and len(flat) == 3 * 4 + 2 * 3
    assert decode_plans(flat) == plans
    assert decode_plans(encode_plans(None)) == []
