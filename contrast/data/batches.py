"""Full batches from sample streams, built in DataLoader workers, with the cursor that resumes them.

Every rank reads ``streams_per_rank`` streams (one per DataLoader worker, or one in the main process without
workers); the batch of step ``s`` comes from local stream ``s mod streams_per_rank``. A worker decodes, transforms and
collates whole batches: a sample that cannot be read is replaced by the next good one from the same stream, so every
batch is full on every rank. Each batch carries its stream's cursor and skip counts; :class:`StreamLoader` keeps the
latest of each, which is what a checkpoint stores, with the spec's plans (what a change of layout left of the
epochs in progress: see :mod:`contrast.data.stream`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from contrast.data.decode import CAUSES, BadSample, SampleReader, Skips, describe_cell
from contrast.data.sources import DataError
from contrast.data.stream import Plans, Stream, mix, next_good
from contrast.errors import UserError

BAD_RUN_LIMIT = 10_000  # this many unreadable samples in a row means the source itself is broken


@dataclass
class StreamSpec:
    """How a rank's streams are made and turned into batches (handed to each DataLoader worker)."""

    make_stream: Callable[[int, int, Plans | None], Stream]  # (global stream index g, streams S, plans) -> stream
    prepare: Callable[[dict, random.Random], dict]  # an undecoded row -> a sample; raises BadSample
    collate: Callable[[list[dict]], dict]
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    per_rank: int = 1
    offset: int = 0  # the first batch of this loader belongs to step offset: local stream offset mod per_rank
    strict: bool = False
    plans: Plans | None = None  # shared by all streams: set from a checkpoint, or by :func:`rebased`

    @property
    def n_streams(self) -> int:
        return self.world * self.per_rank

    def global_index(self, local: int) -> int:
        """Streams are numbered local-major: stream ``g``'s k-th batch is global block ``k x S + g``, i.e. step
        ``k x per_rank + local`` of rank ``g mod world``."""
        return local * self.world + self.rank

    def stream(self, local: int) -> Stream:
        return self.make_stream(self.global_index(local), self.n_streams, self.plans)


def fresh_state(spec: StreamSpec, local: int) -> list[int]:
    """The cursor of a stream that has not started: ``[samples made, *the stream's own state]``."""
    return [0, *spec.stream(local).state()]


class StreamBatches(torch.utils.data.IterableDataset):
    """Endless full batches of one local stream per worker (see the module docstring)."""

    def __init__(self, spec: StreamSpec, cursors: list[list[int]], skips: list[list[int]]):
        self.spec, self.cursors, self.skips = spec, cursors, skips

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        local = (self.spec.offset + (info.id if info else 0)) % self.spec.per_rank
        try:
            yield from _batches(self.spec, local, self.cursors[local], list(self.skips[local]))
        except (UserError, ValueError) as e:  # the main process raises it as a one-line DataError
            yield {"__error__": str(e)}


def _batches(spec: StreamSpec, local: int, cursor: list[int], skips: list[int]) -> Iterator[dict]:
    stream = spec.stream(local)
    stream.restore(cursor[1:])
    made = int(cursor[0])
    reader = SampleReader(strict=spec.strict, skips=Skips(dict(zip(CAUSES, skips))))
    while True:
        samples = []
        while len(samples) < spec.batch_size:
            # a slot's augmentation is drawn from its key: the same on every replay (and every layout, for map sources)
            sample = next_good(stream, lambda row, key: spec.prepare(row, random.Random(mix(spec.seed, 0xA06, key))),
                               lambda row, e: reader.bad(e, describe(row)), BadSample, BAD_RUN_LIMIT)
            note = sample.pop("note", None)
            if note is not None:
                reader.repaired(note, sample.get("caption", ""), describe(sample))
            samples.append(sample)
            made += 1
        batch = spec.collate(samples)
        batch["__stream__"] = torch.tensor(local)
        batch["__cursor__"] = torch.tensor([made, *stream.state()], dtype=torch.long)
        batch["__skips__"] = torch.tensor([reader.skips.counts.get(c, 0) for c in CAUSES], dtype=torch.long)
        yield batch


def describe(row: dict) -> str:
    """Where a row comes from, for messages: its shard key, or its row number and image file."""
    if "__key__" in row:
        return str(row["__key__"])
    return describe_cell(row.get("image"), row.get("__index__"))


class StreamLoader:
    """Iterates a rank's batches (through ``num_workers`` DataLoader workers) and keeps each stream's cursor."""

    def __init__(self, spec: StreamSpec, num_workers: int, cursors: list[list[int]] | None = None,
                 skips: list[list[int]] | None = None, pin_memory: bool = False):
        if num_workers and num_workers != spec.per_rank:
            raise ValueError("one stream per DataLoader worker: spec.per_rank must equal num_workers")
        self.spec = spec
        self.cursors = cursors or [fresh_state(spec, i) for i in range(spec.per_rank)]
        self.skips = skips or [[0] * len(CAUSES) for _ in range(spec.per_rank)]
        self.loader = torch.utils.data.DataLoader(
            StreamBatches(spec, self.cursors, self.skips), batch_size=None, num_workers=num_workers,
            pin_memory=pin_memory, prefetch_factor=4 if num_workers else None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            if "__error__" in batch:
                raise DataError(batch["__error__"])
            local = int(batch.pop("__stream__"))
            self.cursors[local] = batch.pop("__cursor__").tolist()
            self.skips[local] = batch.pop("__skips__").tolist()
            yield batch

    def state(self) -> torch.Tensor:
        """``(per_rank, 1 + cursor width + causes)``: each local stream's cursor and skip counts, after the last
        batch taken."""
        cursors, skips = self.cursors, self.skips
        return torch.tensor([[len(c), *c, *s] for c, s in zip(cursors, skips)], dtype=torch.long)


def skip_counts(totals: list[int]) -> dict[str, int]:
    return {c: int(n) for c, n in zip(CAUSES, totals) if n}


def split_state(rows: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Inverse of :meth:`StreamLoader.state`: (cursors, skips) per stream."""
    cursors, skips = [], []
    for r in rows.tolist():
        w = int(r[0])
        cursors.append(r[1 : 1 + w])
        skips.append(r[1 + w :])
    return cursors, skips


def by_stream(saved: list[list[int]], world: int, per_rank: int) -> list[list[int]]:
    """Saved cursors (rank-major, as ranks gather them) in global stream order ``g = local x world + rank``, without
    their sample counts."""
    if len(saved) != world * per_rank:
        raise ValueError(f"{len(saved)} saved cursors for a layout of {world} x {per_rank} streams")
    return [saved[(g % world) * per_rank + g // world][1:] for g in range(world * per_rank)]


def rebased(spec: StreamSpec, saved: list[list[int]], layout: tuple[int, int], plans: Plans | None,
            start_step: int) -> list[list[int]]:
    """Cursors for this layout's streams from the cursors ``saved`` under ``layout`` (processes, streams per
    process) with its ``plans``: sets ``spec.plans`` to what those streams left of their epochs (shard sources), then
    positions each stream (see each stream's ``remaining`` and ``rebase``)."""
    world, per_rank = layout
    states = by_stream(saved, world, per_rank)
    spec.plans = spec.make_stream(0, world * per_rank, plans).remaining(states)
    out = []
    for local in range(spec.per_rank):
        stream = spec.stream(local)
        stream.rebase(states, start_step)
        out.append([0, *stream.state()])
    return out
