"""Sample streams whose order is a pure function of (seed, epoch, position), with a cursor to resume from.

A training run reads ``S = world_size x streams_per_rank`` streams; stream ``g`` is read by one DataLoader worker of
one rank. Each stream is an endless sequence of rows that moves through the epochs of its source:

- a map-style source (anything with random access: the built-in set, a captions folder, ``save_to_disk``, saved
  features) is permuted every epoch by a seeded bijection of ``range(n)`` (:class:`Permutation`, constant memory
  whatever ``n``); the streams take its positions in blocks of one rank's batch (:class:`MapStream`), so the global
  batch of a step does not depend on the number of processes or workers;
- a shard source (webdataset tars, parquet/arrow files) is a list of units (a shard, or a row range of one); every
  epoch permutes the units (a function of (seed, epoch) shared by all streams), stream ``g`` takes units
  ``g, g + S, ...`` and shuffles each unit's rows through a buffer seeded by (seed, epoch, unit); a unit is cut into
  slices when there are fewer units than streams;
- a mixture draws the source of every slot from its weights with a generator seeded by (seed, stream, slot); a map
  source in a mixture is read in strided shares of each epoch's permutation (:class:`StridedMapStream`).

A stream's state (its cursor) is a short list of integers; restoring it continues exactly where it stopped (a shard
stream re-reads at most the rows of the current unit to refill its shuffle buffer, without decoding them).

Under another layout (another ``S``), shard streams and mixtures continue exactly too: the old streams' cursors say
which units of each epoch in progress are finished and how many rows of each current unit were taken; what is left
(whole units, and the rest of the partial ones from their saved offsets) is a :class:`Plan` per epoch, dealt to the
new streams by index. A unit's rows come out of its buffer in an order fixed by (seed, epoch, unit), so the rest of a
partial unit is its replay with the first rows dropped: no row is repeated or lost. Plans hold two integers per unit
left (``O(units)``, never ``O(rows)``) and are shared by all streams; the cursors stay three integers per stream.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


Plans = list  # per source of a stream: {epoch: Plan} (a shard source after a change of layout) or None


class Stream(Protocol):
    """An endless row source with a resumable integer state."""

    def next(self) -> dict: ...

    def key(self) -> int: ...  # the identity of the slot ``next`` just filled (seeds its augmentation)

    def replace(self, row: dict, attempt: int) -> dict: ...  # a row for the slot whose ``row`` was unreadable

    def state(self) -> list[int]: ...

    def restore(self, state: list[int]) -> None: ...

    def remaining(self, states: list[list[int]]) -> Plans: ...  # what ``states`` (this layout's) left, per source

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
        return self._position(self.taken - 1)

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

    def remaining(self, states: list[list[int]]) -> Plans:
        return [None]  # a map stream needs no plan: its order is a function of the global batch (see rebase)

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


@dataclass
class Plan:
    """What is left of one epoch of a :class:`DealtStream` after a change of layout, in the epoch's item order:
    ``items`` are (position among the epoch's items, rows of that item already taken); stream ``g`` of ``S`` reads
    items ``g, g + S, ...``. ``parts``: how the epoch was cut when it began (shards: slices per unit; a map source in
    a mixture: the number of strided shares)."""

    parts: int
    items: list[tuple[int, int]]


class DealtStream(abc.ABC):
    """Stream ``g`` of ``S`` over epochs of items dealt by index: the items of an epoch are the positions
    ``0 .. count(parts) - 1`` (``parts`` fixed when the epoch begins, by the layout then), or the items of its
    :class:`Plan`; this stream reads items ``g, g + S, ...`` and each item's rows in a fixed order.
    State: ``[epoch, k, rows taken from this stream's k-th item]``. Subclasses say what an item is."""

    def __init__(self, seed: int, g: int, S: int, parts: int, plans: dict[int, Plan] | None):
        self.seed, self.g, self.S, self.parts, self.plans = seed, g, S, parts, plans or {}
        self.epoch, self.k, self.emitted = 0, 0, 0
        self._rows: Iterator[dict] | None = None
        self._at = (0, 0, 0, 0)  # (epoch, parts, unit, first row) of the open item

    @abc.abstractmethod
    def _count(self, parts: int) -> int:
        """How many items an epoch dealt under ``parts`` has."""

    @abc.abstractmethod
    def _unit_rows(self, epoch: int, parts: int, pos: int, skip: int) -> tuple[int, Iterator[dict]]:
        """(the unit at ``pos`` of the epoch, its rows after the first ``skip``)."""

    def _item(self, epoch: int, k: int) -> tuple[int, int, int] | None:
        """(parts, position in the epoch's items, rows to drop) of this stream's k-th item of ``epoch``."""
        j = self.g + k * self.S
        plan = self.plans.get(epoch)
        if plan is not None:
            return (plan.parts, *plan.items[j]) if j < len(plan.items) else None
        return (self.parts, j, 0) if j < self._count(self.parts) else None

    def _open(self) -> Iterator[dict]:
        while (item := self._item(self.epoch, self.k)) is None:  # ends: an epoch without a plan has an item for g
            self.epoch, self.k, self.emitted = self.epoch + 1, 0, 0
        parts, pos, first = item
        u, rows = self._unit_rows(self.epoch, parts, pos, first + self.emitted)
        self._at = (self.epoch, parts, u, first)
        return rows

    def next(self) -> dict:
        limit = self._count(self.parts) + sum(len(p.items) for p in self.plans.values()) + 1
        for _ in range(limit):  # an empty unit moves on; all empty is an error
            if self._rows is None:
                self._rows = self._open()
            row = next(self._rows, None)
            if row is not None:
                self.emitted += 1
                return {**row, "__epoch__": self._at[0]}
            self._rows, self.k, self.emitted = None, self.k + 1, 0
        raise ValueError("every shard of the source is empty")

    def key(self) -> int:
        epoch, parts, u, first = self._at  # the row's identity, whichever stream reads it
        return mix(0x5A4D, epoch, parts, u, first + self.emitted - 1)

    def state(self) -> list[int]:
        return [self.epoch, self.k, self.emitted]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.k, self.emitted = (int(x) for x in state[:3])
        self._rows = None

    def _epoch_items(self, epoch: int) -> tuple[int, list[tuple[int, int]]]:
        plan = self.plans.get(epoch)
        if plan is not None:
            return plan.parts, plan.items
        return self.parts, [(p, 0) for p in range(self._count(self.parts))]

    def remaining(self, states: list[list[int]]) -> Plans:
        """The plans that finish every epoch ``states`` (one per stream of this stream's layout, by stream index)
        were in, and the later epochs this layout's plans cover (begun under an earlier layout): each unit no stream
        finished, from the rows its stream had taken."""
        if len(states) != self.S:
            raise ValueError(f"{len(states)} saved cursors for a layout of {self.S} streams")
        cur = [(int(s[0]), int(s[1]), int(s[2])) for s in states]
        plans = {}
        for e in range(min(c[0] for c in cur), max([c[0] for c in cur] + list(self.plans)) + 1):
            parts, items = self._epoch_items(e)
            left = []
            for j, (pos, first) in enumerate(items):
                epoch, k, taken = cur[j % self.S]
                i = j // self.S  # item j is the i-th of stream j mod S
                if epoch > e or (epoch == e and i < k):
                    continue  # finished
                left.append((pos, first + taken) if (epoch == e and i == k) else (pos, first))
            plans[e] = Plan(parts, left)
        return [plans]

    def rebase(self, states: list[list[int]], start_step: int | None) -> None:
        """Start at the earliest epoch ``states`` were in: exactly what they left of it when this stream's plans are
        their :meth:`remaining`, the whole epoch again without plans."""
        self.restore([min(int(s[0]) for s in states), 0, 0])


class ShardStream(DealtStream):
    """Stream ``g`` of ``S`` over a list of units: units ``g + kS`` of each epoch's unit permutation (a function of
    (seed, epoch)), each unit's rows through a shuffle buffer seeded by (seed, epoch, unit); a unit is cut into
    ``parts`` slices when there are fewer units than streams."""

    def __init__(self, units: list[Unit], seed: int, g: int, S: int, buffer: int,
                 plans: dict[int, Plan] | None = None):
        if not units:
            raise ValueError("a shard source needs at least one shard")
        super().__init__(seed, g, S, -(-S // len(units)), plans)  # so that every stream has a unit to read
        self.units, self.buffer = units, max(1, buffer)

    def _count(self, parts: int) -> int:
        return len(self.units) * parts

    def _unit_rows(self, epoch: int, parts: int, pos: int, skip: int) -> tuple[int, Iterator[dict]]:
        u = Permutation(len(self.units) * parts, mix(self.seed, epoch))(pos)
        unit = self.units[u // parts]
        rows = shuffled(unit.rows(u % parts, parts), self.buffer, random.Random(mix(self.seed, epoch, u)))
        for _ in range(skip):  # rows taken before (a resume, a partial unit): replayed, not decoded
            next(rows, None)
        return u, rows

    def replace(self, row: dict, attempt: int) -> dict:
        return self.next()  # the next row of the same stream


class StridedMapStream(DealtStream):
    """Stream ``g`` of ``S`` over a random-access source in a mixture: rows ``perm_e(g), perm_e(g + S), ...`` of each
    epoch's permutation (all ``n`` rows). Its items are the ``S`` strided shares of the layout that began the epoch,
    so a change of layout deals what is left of them like shard units (the rows of a share are skipped by
    arithmetic, never read). A row that cannot be read is replaced by one drawn from its slot's key."""

    def __init__(self, rows: Any, seed: int, g: int, S: int, plans: dict[int, Plan] | None = None):
        if len(rows) < S:
            raise ValueError(f"a source in a mixture has {len(rows)} rows, fewer than the {S} streams reading it")
        super().__init__(seed, g, S, S, plans)
        self.rows = rows

    def _count(self, parts: int) -> int:
        return parts  # one share per stream of the layout that began the epoch

    def _unit_rows(self, epoch: int, parts: int, pos: int, skip: int) -> tuple[int, Iterator[dict]]:
        perm = Permutation(len(self.rows), mix(self.seed, epoch))
        return pos, (self.rows[perm(p)] for p in range(pos + skip * parts, len(self.rows), parts))

    def replace(self, row: dict, attempt: int) -> dict:
        return self.rows[random.Random(mix(self.seed, 0xBAD, self.key(), attempt)).randrange(len(self.rows))]


class MixStream:
    """Several streams; the source of every slot is drawn from ``weights`` by a generator seeded with
    (seed, stream, slot). State: ``[slot, *each stream's state]``."""

    def __init__(self, streams: list[Stream], weights: list[float], seed: int, g: int):
        total = float(sum(weights))
        if len(streams) != len(weights) or total <= 0 or min(weights) < 0:
            raise ValueError("a mixture needs one non-negative weight per source, not all zero")
        self.streams, self.seed, self.g, self.slot, self.last = streams, seed, g, 0, 0
        acc, self.bounds = 0.0, []
        for w in weights:
            acc += w / total
            self.bounds.append(acc)
        self.widths = [len(s.state()) for s in streams]

    def choose(self) -> int:
        u = random.Random(mix(self.seed, 0x5EED, self.g, self.slot)).random()
        return next((i for i, b in enumerate(self.bounds) if u < b), len(self.bounds) - 1)

    def key(self) -> int:
        return mix(0x317, self.last, self.streams[self.last].key())  # the row's identity in its source

    def next(self) -> dict:
        i = self.last = self.choose()
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

    def remaining(self, states: list[list[int]]) -> Plans:
        parts = [self._split(st) for st in states]
        return [p for i, s in enumerate(self.streams) for p in s.remaining([st[i] for st in parts])]

    def rebase(self, states: list[list[int]], start_step: int | None) -> None:
        """Each source's stream rebases on its own cursors; the draws go on from slots no saved stream reached, so
        the sources keep their shares and no draw is reused."""
        self.slot = max(int(st[0]) for st in states)
        parts = [self._split(st) for st in states]
        for i, s in enumerate(self.streams):
            s.rebase([p[i] for p in parts], None)


def encode_plans(plans: Plans | None) -> list[int]:
    """Plans as a flat list of integers, for a checkpoint: ``[source, epoch, parts, n, pos_1, first_1, ...]`` per
    planned epoch."""
    out: list[int] = []
    for i, per_epoch in enumerate(plans or []):
        for e, plan in sorted((per_epoch or {}).items()):
            out += [i, e, plan.parts, len(plan.items)]
            out += [x for item in plan.items for x in item]
    return out


def decode_plans(flat: list[int]) -> Plans:
    """Inverse of :func:`encode_plans` (None for a source without plans; sources after the last planned one are left
    out)."""
    plans: list[dict[int, Plan] | None] = []
    at = 0
    while at < len(flat):
        i, e, parts, n = (int(x) for x in flat[at : at + 4])
        body = flat[at + 4 : at + 4 + 2 * n]
        if len(body) != 2 * n:
            raise ValueError("the saved data plans are cut short")
        plans += [None] * (i + 1 - len(plans))
        plans[i] = {**(plans[i] or {}), e: Plan(parts, [(int(body[2 * j]), int(body[2 * j + 1])) for j in range(n)])}
        at += 4 + 2 * n
    return plans


def next_good(stream: Stream, prepare: Callable[[dict, int], Any], on_bad: Callable[[dict, Exception], None],
              bad_exc: type[Exception], limit: int) -> Any:
    """Fill the next slot of ``stream``: ``prepare(row, slot key)``; a row it rejects (``bad_exc``) is reported to
    ``on_bad`` and replaced as the stream replaces rows (a mixture keeps the slot's source)."""
    row = stream.next()
    key = stream.key()
    for attempt in range(limit):
        try:
            return prepare(row, key)
        except bad_exc as e:
            on_bad(row, e)
        row = stream.replace(row, attempt)
    raise ValueError(f"{limit} samples in a row could not be read; the last one was {_where(row)}")


def _where(row: dict) -> str:
    return str(row.get("__key__", row.get("__index__", "?")))
