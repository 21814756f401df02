"""Sample streams whose order is a pure function of (seed, epoch, position), with a cursor to resume from.

A training run reads ``S = world_size x streams_per_rank`` streams; stream ``g`` is read by one DataLoader worker of
one rank. Each stream is an endless sequence of rows that moves through the epochs of its source:

- a map-style source (anything with random access: the built-in set, a captions folder, ``save_to_disk``, saved
  features) is permuted every epoch by a seeded bijection of ``range(n)`` (:class:`Permutation`, constant memory
  whatever ``n``); the streams take its positions in blocks of one rank's batch (:class:`MapStream`), so the global
  batch of a step does not depend on the number of processes or workers;
- a shard source (webdataset tars, parquet/arrow files) is a list of units (a shard, or a row range of one); every
  epoch permutes the units, stream ``g`` takes units ``g, g + S, ...`` and shuffles each unit's rows through a seeded
  buffer; a unit is cut into slices when there are fewer units than streams;
- a mixture draws the source of every slot from its weights with a generator seeded by (seed, stream, slot).

A stream's state (its cursor) is a short list of integers; restoring it continues exactly where it stopped (a shard
stream re-reads at most the rows of the current unit to refill its shuffle buffer, without decoding them).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, Protocol

_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 64-bit seed from integers (splitmix64 steps); equal inputs always give the same seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h


class Permutation:
    """A seeded bijection of ``range(n)``: a balanced Feistel network over the next even power of two, walked
    until it lands inside the range. Memory is constant in ``n``; each lookup costs a few hashes."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("a permutation needs at least one element")
        self.n, self.seed = n, seed
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [mix(seed, r) for r in range(self.ROUNDS)]

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (mix(k, right) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._feistel(i)
        while x >= self.n:  # cycle walking: the walk from a point inside the range returns inside it
            x = self._feistel(x)
        return x


class Stream(Protocol):
    """An endless row source with a resumable integer state."""

    def key(self) -> int: ...  # the identity of the next slot (seeds its augmentation)

    def next(self) -> dict: ...

    def replace(self, row: dict, attempt: int) -> dict: ...  # a row for the slot whose ``row`` was unreadable

    def state(self) -> list[int]: ...

    def restore(self, state: list[int]) -> None: ...

    def rebase(self, states: list[list[int]], start_step: int | None) -> None: ...


class MapStream:
    """Stream ``g`` of ``S`` over a random-access source, in blocks of ``block`` samples (one rank's batch).

    Its k-th block is block ``kS + g`` of one global sample sequence, whose sample ``P`` is row
    ``perm_e(P mod E)`` of epoch ``e = P // E`` (``E``: the rows, rounded down to whole global batches). With
    ``g = local stream x world + rank``, the global batch of step ``s`` is samples ``[s x G, (s + 1) x G)`` whatever
    the number of processes and workers: the order depends on the global batch size ``G`` alone. A sample that
    cannot be read is replaced by a row drawn from (seed, P, attempt), also independent of the layout.
    State: ``[samples taken]``."""

    def __init__(self, rows: Any, seed: int, g: int, S: int, block: int, global_batch: int):
        n = len(rows)
        self.epoch_len = (n // global_batch) * global_batch
        if self.epoch_len == 0:
            raise ValueError(f"the source has {n} rows, fewer than one global batch ({global_batch})")
        self.rows, self.seed, self.g, self.S, self.block = rows, seed, g, S, block
        self.taken = 0
        self._perm: Permutation | None = None

    def _position(self, m: int) -> int:
        k, i = divmod(m, self.block)
        return (k * self.S + self.g) * self.block + i

    def key(self) -> int:
        return self._position(self.taken)

    def _row(self, p: int) -> dict:
        e, pos = divmod(p, self.epoch_len)
        if self._perm is None or self._perm.seed != mix(self.seed, e):
            self._perm = Permutation(len(self.rows), mix(self.seed, e))
        return self.rows[self._perm(pos)]

    def next(self) -> dict:
        row = self._row(self._position(self.taken))
        self.taken += 1
        return row

    def replace(self, row: dict, attempt: int) -> dict:
        p = self._position(self.taken - 1)
        return self.rows[random.Random(mix(self.seed, 0xBAD, p, attempt)).randrange(len(self.rows))]

    def state(self) -> list[int]:
        """``[samples taken, epoch of the last one]`` (the epoch only informs :meth:`rebase`)."""
        return [self.taken, self._position(self.taken - 1) // self.epoch_len if self.taken else 0]

    def restore(self, state: list[int]) -> None:
        self.taken = int(state[0])

    def rebase(self, states: list[list[int]], start_step: int | None) -> None:
        """Position this stream for another layout's saved ``states``: exactly at ``start_step`` when its blocks are
        steps (``steps`` is set: one stream per worker of a rank), else at the start of the earliest epoch they were
        in."""
        if start_step is not None and self.steps is not None:
            per_rank, local = self.steps  # this stream's k-th block is step k x per_rank + local
            self.taken = max(0, -(-(start_step - local) // per_rank)) * self.block
            return
        first_block = min(int(st[1]) for st in states) * self.epoch_len // self.block
        self.taken = max(0, -(-(first_block - self.g) // self.S)) * self.block

    steps: tuple[int, int] | None = None  # (streams per rank, this stream's local index) when its blocks are steps


class Unit(Protocol):
    """Part of a shard source: ``rows(slice_index, slices)`` yields its rows (every ``slices``-th from
    ``slice_index``)."""

    name: str

    def rows(self, part: int, parts: int) -> Iterator[dict]: ...


def shuffled(rows: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Rows through a shuffle buffer of ``size``; the draws depend only on ``rng``, never on the rows."""
    buf: list[dict] = []
    for row in rows:
        if len(buf) < size:
            buf.append(row)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], row
        yield out
    rng.shuffle(buf)
    yield from buf


class ShardStream:
    """Stream ``g`` of ``S`` over a list of units: units ``g + kS`` of each epoch's unit permutation, each unit's rows
    through a seeded shuffle buffer. State: ``[epoch, k, rows emitted from the current unit]``."""

    def __init__(self, units: list[Unit], seed: int, g: int, S: int, buffer: int):
        if not units:
            raise ValueError("a shard source needs at least one shard")
        self.parts = -(-S // len(units))  # slices per unit, so that every stream has a unit to read
        self.units, self.seed, self.g, self.S, self.buffer = units, seed, g, S, max(1, buffer)
        self.epoch, self.k, self.emitted, self.count = 0, 0, 0, 0
        self._rows: Iterator[dict] | None = None

    def _open(self) -> Iterator[dict]:
        n_units = len(self.units) * self.parts
        pos = self.g + self.k * self.S
        if pos >= n_units:
            self.epoch, self.k = self.epoch + 1, 0
            pos = self.g
        u = Permutation(n_units, mix(self.seed, self.epoch))(pos)
        unit, part = self.units[u // self.parts], u % self.parts
        rows = shuffled(unit.rows(part, self.parts), self.buffer, random.Random(mix(self.seed, self.epoch, u)))
        for _ in range(self.emitted):  # resuming inside the unit: replay its buffer without decoding
            next(rows, None)
        return rows

    def next(self) -> dict:
        for _ in range(len(self.units) * self.parts + 1):  # an empty unit moves on; all empty is an error
            if self._rows is None:
                self._rows = self._open()
            row = next(self._rows, None)
            if row is not None:
                self.emitted += 1
                self.count += 1
                return row
            self._rows, self.k, self.emitted = None, self.k + 1, 0
        raise ValueError("every shard of the source is empty")

    def key(self) -> int:
        return mix(self.g, self.count)

    def replace(self, row: dict, attempt: int) -> dict:
        return self.next()  # the next row of the same stream

    def state(self) -> list[int]:
        return [self.epoch, self.k, self.emitted, self.count]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.k, self.emitted, self.count = (int(x) for x in state[:4])
        self._rows = None

    def rebase(self, states: list[list[int]], start_step: int | None) -> None:
        self.restore([min(int(s[0]) for s in states), 0, 0, 0])


class MixStream:
    """Several streams; the source of every slot is drawn from ``weights`` by a generator seeded with
    (seed, stream, slot). State: ``[slot, *each stream's state]``."""

    def __init__(self, streams: list[Stream], weights: list[float], seed: int, g: int):
        total = float(sum(weights))
        if len(streams) != len(weights) or total <= 0 or min(weights) < 0:
            raise ValueError("a mixture needs one non-negative weight per source, not all zero")
        self.streams, self.seed, self.g, self.slot = streams, seed, g, 0
        acc, self.bounds = 0.0, []
        for w in weights:
            acc += w / total
            self.bounds.append(acc)
        self.widths = [len(s.state()) for s in streams]

    def choose(self) -> int:
        u = random.Random(mix(self.seed, 0x5EED, self.g, self.slot)).random()
        return next((i for i, b in enumerate(self.bounds) if u < b), len(self.bounds) - 1)

    def key(self) -> int:
        return mix(self.g, self.slot)

    def next(self) -> dict:
        i = self.choose()
        self.slot += 1
        return {**self.streams[i].next(), "__source__": i}

    def replace(self, row: dict, attempt: int) -> dict:
        i = row["__source__"]  # the slot keeps its source
        return {**self.streams[i].replace(row, attempt), "__source__": i}

    def state(self) -> list[int]:
        return [self.slot] + [x for s in self.streams for x in s.state()]

    def _split(self, state: list[int]) -> list[list[int]]:
        out, at = [], 1
        for w in self.widths:
            out.append(list(state[at : at + w]))
            at += w
        return out

    def restore(self, state: list[int]) -> None:
        self.slot = int(state[0])
        for s, part in zip(self.streams, self._split(state)):
            s.restore(part)

    def rebase(self, states: list[list[int]], start_step: int | None) -> None:
        self.slot = 0
        parts = [self._split(st) for st in states]
        for i, s in enumerate(self.streams):
            s.rebase([p[i] for p in parts], None)


def next_good(stream: Stream, prepare: Callable[[dict, int], Any], on_bad: Callable[[dict, Exception], None],
              bad_exc: type[Exception], limit: int) -> Any:
    """Fill the next slot of ``stream``: ``prepare(row, slot key)``; a row it rejects (``bad_exc``) is reported to
    ``on_bad`` and replaced as the stream replaces rows (a mixture keeps the slot's source)."""
    key = stream.key()
    row = stream.next()
    for attempt in range(limit):
        try:
            return prepare(row, key)
        except bad_exc as e:
            on_bad(row, e)
        row = stream.replace(row, attempt)
    raise ValueError(f"{limit} samples in a row could not be read; the last one was {_where(row)}")


def _where(row: dict) -> str:
    return str(row.get("__key__", row.get("__index__", "?")))
