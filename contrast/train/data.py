"""The training data of a recipe: streams over its source (or mixture), turned into full batches by DataLoader
workers, with the cursor a checkpoint stores to resume mid-epoch exactly.

Data order is a pure function of (seed, epoch, position): see :mod:`contrast.data.stream`. Resuming with the same
world size and worker count continues every stream where it stopped. Under another number of processes or workers:
a map source (random access), whose order depends only on the global batch size, continues exactly with the same
global batch (and restarts the epoch it had reached with another); a shard source, and any source of a mixture,
continues exactly whatever the new layout and batch size: the units (in a mixture, a map source's strided shares)
and rows the old streams had not taken are dealt to the new streams, and each is read once.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from contrast import distributed as D
from contrast.config import Config, DataConfig
from contrast.data.batches import StreamLoader, StreamSpec, rebased, skip_counts, split_state
from contrast.data.collate import Collator, FeatureSamples, ImageSamples, pair_id_keys
from contrast.data.sources import DataError, RowSource, open_rows
from contrast.data.stream import (
    MapStream,
    MixStream,
    Plans,
    ShardStream,
    Stream,
    StridedMapStream,
    decode_plans,
    encode_plans,
)
from contrast.data.transforms import model_transform, normalise_batch
from contrast.errors import CheckpointError
from contrast.features import build_feature_data
from contrast.tokenizer import TrimmedTokenizer


def default_workers(world_local: int = 1) -> int:
    """Decoding workers per rank: one per CPU core this process may use beyond the one training, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, world_local) - 1))


def num_workers(cfg: DataConfig, world_local: int = 1) -> int:
    if cfg.num_workers is None:
        return default_workers(world_local)
    if cfg.num_workers < 0:
        raise DataError(f"data.num_workers must be 0 or more, got {cfg.num_workers}")
    return cfg.num_workers


def _stream_factory(sources: list[RowSource], weights: list[float], cfg: Config, dist: D.DistInfo
                    ) -> Callable[[int, int, Plans | None], Stream]:
    seed, buffer, block = cfg.train.seed, cfg.data.shuffle_buffer, cfg.train.batch_size
    global_batch = block * dist.world_size

    def one(src: RowSource, i: int, g: int, S: int, plans: Plans | None) -> Stream:
        s = mix_seed(seed, i)
        plan = plans[i] if plans and i < len(plans) else None
        if src.units is not None:
            return ShardStream(src.units, s, g, S, buffer, plan)
        if len(sources) > 1:  # in a mixture: strided shares of each epoch, dealt anew under another layout
            return StridedMapStream(src.rows, s, g, S, plan)
        return MapStream(src.rows, s, g, S, block, global_batch)

    def make(g: int, S: int, plans: Plans | None = None) -> Stream:
        if len(sources) > 1:
            return MixStream([one(src, i, g, S, plans) for i, src in enumerate(sources)], weights, seed, g)
        stream = one(sources[0], 0, g, S, plans)
        if isinstance(stream, MapStream):  # its blocks are this rank's batches of steps k x per_rank + local
            stream.steps = (S // dist.world_size, g // dist.world_size)
        return stream

    return make


def mix_seed(seed: int, source: int) -> int:
    return seed if source == 0 else seed * 1_000_003 + source  # source 0 keeps the recipe's seed


def _sources(cfg: Config, split: str) -> tuple[list[RowSource], list[float]]:
    size = cfg.model.image.image_size
    if cfg.data.mixture and split == cfg.data.train_split:
        for m in cfg.data.mixture:
            if not m.source:
                raise DataError("every data.mixture entry needs a source")
            if m.weight < 0:
                raise DataError(f"data.mixture weight {m.weight} for {m.source} is negative")
        if sum(m.weight for m in cfg.data.mixture) <= 0:
            raise DataError("data.mixture weights are all zero")
        return [open_rows(cfg.data, split, size, m.source) for m in cfg.data.mixture], [m.weight for m in cfg.data.mixture]
    return [open_rows(cfg.data, split, size)], [1.0]


def _check_size(sources: list[RowSource], global_batch: int, n_streams: int) -> None:
    for src in sources:
        if src.rows is None:
            continue
        n = len(src.rows)
        if n < global_batch:
            raise DataError(f"the training split of {src.name} has {n} rows, fewer than one global batch "
                            f"({global_batch}); lower train.batch_size")


def build_spec(cfg: Config, tokenizer: Callable, split: str, dist: D.DistInfo, per_rank: int, offset: int = 0
               ) -> StreamSpec:
    t = cfg.train
    if cfg.model.features_dir:  # saved frozen-tower features replace images (BLIP-2 stage 1 / 2)
        rows, collate = build_feature_data(cfg, tokenizer, split)
        sources, weights, prepare = [RowSource(str(cfg.model.features_dir), rows=rows)], [1.0], FeatureSamples()
    else:
        sources, weights = _sources(cfg, split)
        exact = cfg.model.text.kind == "clip" and cfg.model.text.causal and not cfg.model.text.tokenizer  # BPE only
        keys = pair_id_keys(cfg)  # loss.positives: the caption / group column hashed into pair_ids
        collate = Collator(TrimmedTokenizer(tokenizer) if exact else tokenizer, keys)
        prepare = ImageSamples(model_transform(cfg.model, cfg.data.augment), cfg.data.max_image_pixels, keys)
    _check_size(sources, t.batch_size * dist.world_size, dist.world_size * per_rank)
    return StreamSpec(_stream_factory(sources, weights, cfg, dist), prepare, collate, t.batch_size, t.seed, dist.rank,
                      dist.world_size, per_rank, offset, cfg.data.strict)


def build_loader(cfg: Config, tokenizer: Callable, split: str, dist: D.DistInfo | None = None, start_step: int = 0,
                 state: dict | None = None) -> StreamLoader:
    """This rank's endless stream of training batches; ``state`` is what :func:`loader_state` saved."""
    dist = dist or D.DistInfo()
    workers = num_workers(cfg.data, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    spec = build_spec(cfg, tokenizer, split, dist, max(1, workers), offset=start_step % max(1, workers))
    cursors, skips = resume_streams(spec, dist, start_step, state)
    return StreamLoader(spec, workers, cursors, skips, pin_memory=torch.cuda.is_available())


def resume_streams(spec: StreamSpec, dist: D.DistInfo, start_step: int, state: dict | None
                   ) -> tuple[list[list[int]] | None, list[list[int]] | None]:
    """This rank's stream cursors and skip counts from a checkpoint's data ``state`` (None: a fresh start), for
    the layout of ``spec``; sets ``spec.plans`` (from the checkpoint, or dealt anew for another layout)."""
    if state is None:
        return None, None
    saved_c, saved_s = split_state(state["streams"])
    layout = (int(state["layout"][0]), int(state["layout"][1]))
    width = len(spec.stream(0).state()) + 1
    if any(len(c) != width for c in saved_c):
        raise CheckpointError(f"the checkpoint's data cursors hold {len(saved_c[0])} integers per stream where this "
                              f"run's data needs {width}: it was written for other data sources (data.source / "
                              "data.mixture) or by an older version; resume with the sources and version it was "
                              "written with")
    plans = decode_plans(torch.as_tensor(state.get("plans", []), dtype=torch.long).tolist())
    if layout == (dist.world_size, spec.per_rank):
        spec.plans = plans
        mine = slice(dist.rank * spec.per_rank, (dist.rank + 1) * spec.per_rank)
        return saved_c[mine], saved_s[mine]
    cursors = rebased(spec, saved_c, layout, plans, start_step)
    totals = torch.tensor(saved_s).sum(0).tolist()
    skips = [totals if (dist.rank == 0 and i == 0) else [0] * len(totals) for i in range(spec.per_rank)]
    if dist.is_main:
        print(f"the checkpoint's data layout was {layout[0]} processes x {layout[1]} streams, this run's is "
              f"{dist.world_size} x {spec.per_rank}: the data order continues at this step (shard sources and "
              "mixtures: exactly, each remaining sample of the epoch once; a map source alone: exactly with the same "
              "global batch, else from the start of the epoch it had reached)")
    return cursors, skips


def loader_state(loader: StreamLoader, dist: D.DistInfo) -> dict:
    """Every rank's stream cursors (a collective: all ranks call it) and the plans they share, as a checkpoint stores
    them."""
    local = loader.state()
    rows = D.gather_with_grad(local) if dist.world_size > 1 else local
    return {"layout": [dist.world_size, loader.spec.per_rank], "streams": rows,
            "plans": torch.tensor(encode_plans(loader.spec.plans), dtype=torch.long)}


def total_skips(state: dict) -> dict[str, int]:
    _, skips = split_state(state["streams"])
    return skip_counts(torch.tensor(skips).sum(0).tolist())


def to_device(batch: dict, device: torch.device, image_cfg) -> dict:
    """The batch on ``device``; uint8 pixels (as the loader sends them) are normalised there."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixels" in batch and batch["pixels"].dtype == torch.uint8:
        mean = torch.tensor(image_cfg.mean).view(-1, 1, 1)
        batch["pixels"] = normalise_batch(batch["pixels"], mean, torch.tensor(image_cfg.std).view(-1, 1, 1))
    return batch
