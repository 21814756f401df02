"""Shared fixtures: tiny configs that train in seconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


class StoppedAfterCheckpoint(Exception):
    """Raised by :func:`stop_after_first_checkpoint` right after a run's first checkpoint is written."""


def stop_after_first_checkpoint(monkeypatch) -> None:
    """Make the training loop stop (raise StoppedAfterCheckpoint) once its first checkpoint is on disk: a run cut
    short at that point of its own schedule, to be resumed."""
    import contrast.train.loop as loop

    save = loop.C.save_checkpoint

    def save_then_stop(*a, **k):
        save(*a, **k)
        raise StoppedAfterCheckpoint

    monkeypatch.setattr(loop.C, "save_checkpoint", save_then_stop)


def tiny_config(tmp_cache=None, **train):
    from contrast.config import Config

    cfg = Config()
    cfg.model.embed_dim = 32
    cfg.model.image.image_size = 16
    cfg.model.image.kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    cfg.model.text.context_length = 16
    cfg.model.text.width = 32
    cfg.model.text.layers = 1
    cfg.model.text.heads = 2
    cfg.data.synthetic.train_size = 256
    cfg.data.synthetic.val_size = 32
    cfg.data.synthetic.test_size = 64
    cfg.data.cache_dir = tmp_cache
    cfg.train.batch_size = 16
    cfg.train.steps = 4
    cfg.train.warmup_steps = 1
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 0
    cfg.train.lr = 1e-3
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def tiny_model_dict(kind: str = "clip", context_length: int = 16, text_layers: int = 1) -> dict:
    """A model section (as a recipe would hold it) for a 16 px ViT and a 32-wide text transformer."""
    return {
        "kind": kind,
        "embed_dim": 32,
        "image": {
            "name": "vit_tiny_patch16_224",
            "image_size": 16,
            "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        },
        "text": {"context_length": context_length, "width": 32, "layers": text_layers, "heads": 2},
    }


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_cache):
    """A small CLIP trained long enough on the built-in set to classify colours zero-shot."""
    from contrast.train.loop import train

    cfg = tiny_config(data_cache, steps=120, batch_size=64, lr=2e-3, warmup_steps=10)
    cfg.model.image.image_size = 32
    cfg.model.image.kwargs = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
    cfg.model.text.width = 64
    cfg.model.embed_dim = 64
    cfg.data.synthetic.train_size = 4096
    cfg.data.synthetic.test_size = 300
    cfg.train.log_every = 20
    run = tmp_path_factory.mktemp("trained") / "run"
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss on one thread for a test module (index builds and searches whose results depend on threading)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
