"""The training loop. It builds a model and an objective from the config and never knows which objective it runs.

Data order is a pure function of (seed, step): each epoch is a seeded permutation, cut into global batches, and
rank r of W takes the r-th slice of each. Resuming at step k therefore continues with exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from contrast import distributed as D
from contrast.config import Config, save_config
from contrast.data import load_source
from contrast.data.collate import Collator
from contrast.data.transforms import build_transform
from contrast.errors import UserError
from contrast.models import build_model
from contrast.objectives import build_objective
from contrast.tokenizer import build_tokenizer
from contrast.train import checkpoint as C
from contrast.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    last_loss: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    skipped_images: int = 0
    skipped_captions: int = 0
    eval: dict = field(default_factory=dict)


class _Rows(torch.utils.data.Dataset):
    """Rows of a datasets.Dataset with images left undecoded (decoding, and its failures, belong to the collator)."""

    def __init__(self, ds):
        from datasets import Image as ImageFeature

        self.ds = ds.cast_column("image", ImageFeature(decode=False))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[int(i)], "__index__": int(i)}

    def __getitems__(self, idx: list[int]) -> list[dict]:
        cols = self.ds[[int(i) for i in idx]]
        return [{**{k: v[j] for k, v in cols.items()}, "__index__": int(i)} for j, i in enumerate(idx)]


def batch_indices(n: int, batch_size: int, world: int, rank: int, seed: int, start_step: int, steps: int):
    """Yield this rank's index list for every step in [start_step, steps)."""
    global_bs = batch_size * world
    per_epoch = n // global_bs
    if per_epoch == 0:
        raise ValueError(
            f"the training split has {n} rows, fewer than one global batch ({global_bs}); lower train.batch_size"
        )
    perm, perm_epoch = None, -1
    for step in range(start_step, steps):
        epoch, pos = divmod(step, per_epoch)
        if epoch != perm_epoch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm, perm_epoch = torch.randperm(n, generator=g), epoch
        lo = pos * global_bs + rank * batch_size
        yield perm[lo : lo + batch_size].tolist()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=key, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def build_data(cfg: Config, tokenizer, split: str):
    if cfg.model.blip2.features:  # saved frozen-tower features replace images (BLIP-2 stage 1 / 2)
        from contrast.features import build_feature_data

        return build_feature_data(cfg, tokenizer, split)
    ds = load_source(cfg.data, split)
    return _Rows(ds), Collator(build_transform(cfg.model.image, train=split == cfg.data.train_split), tokenizer)


def train(cfg: Config, out_dir: str | Path, resume: str | None = None, progress: bool = True) -> RunResult:
    """Train ``cfg`` into ``out_dir``; ``resume`` is None, 'latest' or a checkpoint path."""
    dist_info = D.init_from_env(_device(cfg.train.device))
    device = _device(cfg.train.device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(out_dir)
    main = dist_info.is_main
    if main:
        if not resume and (run_dir / "checkpoints" / "latest").is_file():
            raise UserError(
                f"{run_dir} already holds a trained run; continue it with --resume latest, or pass another --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    _seed_all(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    tokenizer = build_tokenizer(cfg.model.text)
    rows, collate = build_data(cfg, tokenizer, cfg.data.train_split)

    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train)
    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpt = C.resolve(run_dir if resume == "latest" else resume)
        C.load_model_weights(model, ckpt / C.WEIGHTS)
        state = C.load_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        C.set_rng_state(state["rng"])
        start = int(state["step"])
        if state.get("world_size", 1) != dist_info.world_size:
            raise C.CheckpointError(
                f"{ckpt} was written by a run of {state.get('world_size', 1)} processes; resume with the same number"
            )
        if main:
            _truncate_metrics(metrics_path, start)
            print(f"resumed from {ckpt} at step {start}")

    train_model: nn.Module = model
    if dist_info.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    gather = D.gather_with_grad if dist_info.world_size > 1 else None
    if hasattr(model, "set_distributed"):  # a forward that needs the global batch (BLIP's hard negatives)
        model.set_distributed(gather, dist_info.rank)
    objective = build_objective(cfg.loss, gather=gather, rank=dist_info.rank)

    loader = torch.utils.data.DataLoader(
        rows,
        batch_sampler=list(
            batch_indices(len(rows), cfg.train.batch_size, dist_info.world_size, dist_info.rank,
                          cfg.train.seed, start, cfg.train.steps)
        ),
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    if cfg.train.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got '{cfg.train.precision}'")

    result = RunResult(run_dir=run_dir, step=start, last_loss=float("nan"))
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and main), dynamic_ncols=True)
    metrics_f = open(metrics_path, "a") if main else None
    model.train()
    t_last, n_images = time.perf_counter(), 0
    step = start
    try:
        for batch in loader:
            if batch is None:  # every row of this batch was unreadable; the counts are reported at the end
                step += 1
                sched.step()
                continue
            batch = _to(batch, device)
            with autocast:
                out = train_model(batch)
                losses = objective(out)
            loss = losses.total
            if not torch.isfinite(loss):
                saved = C.save_checkpoint(run_dir, step, model, opt, sched, {"world_size": dist_info.world_size},
                                          keep=cfg.train.keep_checkpoints + 1) if main else None
                raise NonFiniteLossError(
                    f"the loss became {loss.item()} at step {step} (terms: "
                    f"{ {k: round(float(v), 4) for k, v in losses.parts.items()} }). The weights before this step "
                    f"are saved in {saved}. Lower train.lr, raise train.warmup_steps or set train.grad_clip, then "
                    "resume with --resume latest."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            step += 1
            n_images += batch["index"].shape[0] * dist_info.world_size
            value = float(D.all_reduce_mean(loss.detach()))
            result.losses.append((step, value))
            result.last_loss = value
            if main and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                now = time.perf_counter()
                ips = n_images / max(now - t_last, 1e-9)
                t_last, n_images = now, 0
                rec = {"step": step, "loss": value, "lr": opt.param_groups[0]["lr"], "images_per_s": round(ips, 1)}
                rec.update({f"loss/{k}": float(v) for k, v in losses.parts.items()})
                if hasattr(out, "logit_scale"):
                    rec["logit_scale"] = float(out.logit_scale.detach())
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                bar.set_postfix(loss=f"{value:.3f}", scale=f"{rec.get('logit_scale', 0):.1f}", img_s=f"{ips:.0f}")
            bar.update(1)
            if main and cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                result.checkpoint = C.save_checkpoint(
                    run_dir, step, model, opt, sched, {"world_size": dist_info.world_size}, keep=cfg.train.keep_checkpoints
                )
    finally:
        bar.close()
        if metrics_f:
            metrics_f.close()
    result.step = step
    if main and (result.checkpoint is None or result.checkpoint.name != C.step_dir(run_dir, step).name):
        result.checkpoint = C.save_checkpoint(
            run_dir, step, model, opt, sched, {"world_size": dist_info.world_size}, keep=cfg.train.keep_checkpoints
        )
    if main:
        plot_losses(metrics_path, run_dir / "loss.png")
    result.skipped_images, result.skipped_captions = collate.skipped_images, collate.skipped_captions
    D.barrier()
    return result
