"""Elastic exact resume of shard sources: a run checkpointed under N processes x W workers resumes under N' x W' and
reads every remaining sample of the epoch exactly once (counted by the sample's key), and a mixture of shard sources
keeps its shares. Ranks are simulated in one process (a loader per rank, built as each rank builds its own, with
real DataLoader workers); their cursors are put together as the checkpoint's gather would."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_config

from contrast.config import DataConfig, MixtureSource, SyntheticConfig
from contrast.data.batches import StreamLoader
from contrast.data.shard import write_shards
from contrast.distributed import DistInfo
from contrast.train.data import build_spec, loader_state, resume_streams

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on 2 cores


def _shards(out, n, shard_size, seed=0):
    cfg = DataConfig(source="synthetic", synthetic=SyntheticConfig(train_size=n, seed=seed))
    write_shards(cfg, out, "train", shard_size=shard_size, image_size=16)
    return str(out)


def identify(row, rng):
    """A sample as (source, epoch, key): no decoding, the test is about which samples are read."""
    return {"source": row.get("__source__", 0), "epoch": row["__epoch__"], "key": row["json"]["source_index"]}


def stack(samples):
    return {k: torch.tensor([s[k] for s in samples]) for k in ("source", "epoch", "key")}


def _loaders(cfg, world, workers, start, state):
    out = []
    for rank in range(world):
        dist = DistInfo(rank=rank, world_size=world)
        spec = build_spec(cfg, lambda texts: None, "train", dist, workers, offset=start % workers)
        spec.prepare, spec.collate = identify, stack
        cursors, skips = resume_streams(spec, dist, start, state)
        out.append(StreamLoader(spec, workers, cursors, skips))
    return out


def _stage(cfg, world, workers, batch, start, state, steps=0, epoch_at=()):
    """``steps`` training steps (every rank takes one batch each), then more until every stream has left epoch 0 of
    each source (``epoch_at``: where each source's epoch sits in a stream's cursor). Returns the samples read, the
    checkpoint's data state and the step reached."""
    cfg.train.batch_size = batch
    loaders = _loaders(cfg, world, workers, start, state)
    its, seen, step = [iter(ld) for ld in loaders], [], start
    while step - start < steps or min([c[i] for ld in loaders for c in ld.cursors for i in epoch_at] or [1]) < 1:
        for it in its:
            b = next(it)
            seen += zip(b["source"].tolist(), b["epoch"].tolist(), b["key"].tolist())
        step += 1
        assert step - start < 200
    parts = [loader_state(ld, DistInfo(rank=r, world_size=world)) for r, ld in enumerate(loaders)]
    del its
    state = {"layout": parts[0]["layout"], "streams": torch.cat([p["streams"] for p in parts]),
             "plans": parts[0]["plans"]}
    return seen, state, step


def _epoch0(seen, source):
    return sorted(k for s, e, k in seen if s == source and e == 0)


def test_shards_resumed_from_2x2_to_1x3_and_back_read_the_epoch_once(tmp_path):
    """300 samples in 12 shards of 25, shuffle buffer 8. 2 processes x 2 workers (batch 5 each) for 9 steps, then
    1 process x 3 workers (batch 8) for 13 steps, then 2 x 2 again until every stream is in epoch 1: epoch 0 is read
    exactly once, counted by sample key, and the checkpoints sat mid-shard."""
    cfg = tiny_config()
    cfg.data.source = _shards(tmp_path / "a", 300, 25)
    cfg.data.shuffle_buffer = 8
    a, state, step = _stage(cfg, 2, 2, 5, 0, None, steps=9)
    assert len(a) == 90 and {e for _, e, _ in a} == {0}
    cursors = state["streams"][:, 1:]  # [made, epoch, k, taken in the unit] per stream
    assert cursors[:, 3].ne(0).any()  # stopped inside units
    b, state, step = _stage(cfg, 1, 3, 8, step, state, steps=13)
    assert len(state["plans"]) > 0
    c, state, _ = _stage(cfg, 2, 2, 5, step, state, epoch_at=(1,))
    seen = a + b + c
    got = _epoch0(seen, 0)
    assert got == list(range(300)), Counter(got).most_common(3)
    assert any(e == 1 for _, e, _ in seen)  # some streams went on into epoch 1 while others finished epoch 0


def test_a_mixture_of_shard_sources_resumed_under_another_layout_keeps_shares_and_reads_each_sample_once(tmp_path):
    """Sources of 180 samples (9 shards) and 60 samples (3 shards: cut in 2 slices each under 4 streams), weights
    3 : 1. 2 x 2 for 10 steps, 1 x 3 for 12 steps, 2 x 2 for 15 steps and on until every stream has left epoch 0 of
    both sources: each source's epoch 0 is read exactly once, and the share of the first source in the draws after
    the first change of layout is 0.75 within 3 binomial standard deviations (about 0.08 for the 250 draws)."""
    cfg = tiny_config()
    cfg.data.mixture = [MixtureSource(source=_shards(tmp_path / "a", 180, 20), weight=3.0),
                        MixtureSource(source=_shards(tmp_path / "b", 60, 20, seed=1), weight=1.0)]
    cfg.data.shuffle_buffer = 6
    a, state, step = _stage(cfg, 2, 2, 5, 0, None, steps=10)
    b, state, step = _stage(cfg, 1, 3, 8, step, state, steps=12)
    c, state, _ = _stage(cfg, 2, 2, 5, step, state, steps=15, epoch_at=(2, 5))
    seen = a + b + c
    assert _epoch0(seen, 0) == list(range(180))
    assert _epoch0(seen, 1) == list(range(60))
    after = [s for s, _, _ in b + c]
    assert len(after) >= 240
    share = after.count(0) / len(after)
    assert abs(share - 0.75) < 3 * (0.75 * 0.25 / len(after)) ** 0.5, (share, len(after))
    assert 0 < sum(s for s, _, _ in c) < len(c)  # both sources are drawn after the second change too


@pytest.mark.parametrize("world,workers", [(1, 3), (2, 2)])
def test_same_layout_resume_continues_the_same_samples(tmp_path, world, workers):
    """Resumed under its own layout, a run reads what the uninterrupted run reads after the checkpoint."""
    cfg = tiny_config()
    cfg.data.source = _shards(tmp_path / "a", 120, 20)
    cfg.data.shuffle_buffer = 6
    whole, _, _ = _stage(cfg, world, workers, 4, 0, None, steps=14)
    head, state, step = _stage(cfg, world, workers, 4, 0, None, steps=5)
    tail, _, _ = _stage(cfg, world, workers, 4, step, state, steps=9)
    assert head + tail == whole


def test_cursors_of_another_format_stop_the_resume_with_a_message(tmp_path):
    from contrast.errors import CheckpointError

    cfg = tiny_config()
    cfg.data.source = _shards(tmp_path / "a", 40, 20)
    spec = build_spec(cfg, lambda texts: None, "train", DistInfo(), 1)
    state = {"layout": [1, 1], "streams": torch.tensor([[5, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])}
    with pytest.raises(CheckpointError, match="5 integers per stream where this run's data needs 4"):
        resume_streams(spec, DistInfo(), 3, state)


def test_training_resumed_with_more_workers_stores_the_plan_of_what_was_left(tmp_path, monkeypatch, capsys):
    """End to end through the training loop: 1 process x 2 workers (batch 4) stopped after its step-3 checkpoint,
    resumed with 3 workers. At step 3 stream 0 had made the batches of steps 1 and 3 (8 rows of the unit at position 0
    of epoch 0's permutation) and stream 1 the batch of step 2 (4 rows of position 1), so the plan the resumed run
    deals and checkpoints is every position of the 6 shards in order, those two from rows 8 and 4."""
    from conftest import StoppedAfterCheckpoint, stop_after_first_checkpoint

    from contrast.data.stream import Plan, decode_plans
    from contrast.train.loop import train

    cfg = tiny_config(steps=6, checkpoint_every=3, batch_size=4)
    cfg.data.source = _shards(tmp_path / "a", 120, 20)
    cfg.data.num_workers, cfg.data.shuffle_buffer = 2, 5
    with monkeypatch.context() as m:
        stop_after_first_checkpoint(m)
        with pytest.raises(StoppedAfterCheckpoint):
            train(cfg, tmp_path / "run", progress=False)
    cfg.data.num_workers = 3
    result = train(cfg, tmp_path / "run", resume="latest", progress=False)
    assert result.step == 6
    assert "layout was 1 processes x 2 streams, this run's is 1 x 3" in capsys.readouterr().out
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert state["data"]["layout"] == [1, 3]
    assert decode_plans(state["data"]["plans"].tolist()) == [{0: Plan(1, [(0, 8), (1, 4), (2, 0), (3, 0), (4, 0),
                                                                             (5, 0)])}]
