"""What a run writes as it trains: ``metrics.jsonl`` (one JSON object per logged step and per evaluation, and a
summary at the end), TensorBoard event files in ``tensorboard/`` (and Weights & Biases when asked for), the
progress bar and ``loss.png`` at the end. Only the main process writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from contrast.config import ConfigError

TENSORBOARD = "tensorboard"


class Sinks:
    """Scalar sinks besides metrics.jsonl: TensorBoard (``purge_step`` drops what a resumed run rewrites) and a
    Weights & Biases run (resumed under the same id when the run directory is resumed)."""

    def __init__(self, run_dir: Path, start: int, tensorboard: bool, wandb_project: str | None, config: dict):
        self.tb = self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=start + 1 if start else None)
        if wandb_project:
            self.wandb = _wandb_run(run_dir, wandb_project, config)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(run_dir: Path, project: str, config: dict) -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("train.wandb names a Weights & Biases project, but the wandb package is not installed: "
                          "pip install wandb (or remove train.wandb)") from e
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), config=config,
                      name=run_dir.name)


class RunLog:
    def __init__(self, run_dir: Path, steps: int, start: int, main: bool, progress: bool, *, resumed: bool = False,
                 tensorboard: bool = False, wandb: str | None = None, config: dict | None = None):
        self.run_dir, self.main = run_dir, main
        self.metrics_path = run_dir / "metrics.jsonl"
        if main and (start or resumed):
            truncate_metrics(self.metrics_path, start)  # a resumed run rewrites the steps after its checkpoint
        self.file = open(self.metrics_path, "a") if main else None
        self.sinks = Sinks(run_dir, start, tensorboard, wandb, config or {}) if main else None
        self.bar = tqdm(total=steps, initial=start, disable=not (progress and main), dynamic_ncols=True)
        self.t_last, self.n_images = time.perf_counter(), 0

    def count(self, images: int) -> None:
        self.n_images += images

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, step: int, loss: float, losses, out, lr: float, extra: dict | None = None) -> None:
        """One logged step: loss, its terms, learning rate, images/s since the last logged step, logit scale, and
        ``extra`` (gradient norm, non-finite steps so far)."""
        if not self.main:
            return
        now = time.perf_counter()
        ips = self.n_images / max(now - self.t_last, 1e-9)
        self.t_last, self.n_images = now, 0
        rec = {"step": step, "loss": loss, "lr": lr, "images_per_s": round(ips, 1)}
        rec.update({f"loss/{k}": float(v) for k, v in losses.parts.items()})
        if out.logit_scale is not None:
            rec["logit_scale"] = float(out.logit_scale.detach())
        if out.logit_bias is not None:
            rec["logit_bias"] = float(out.logit_bias.detach())
        rec.update(extra or {})
        self._record(rec)
        self.sinks.scalars(step, {k: float(v) for k, v in rec.items() if k != "step"})
        self.bar.set_postfix(loss=f"{loss:.3f}", scale=f"{rec.get('logit_scale', 0):.1f}", img_s=f"{ips:.0f}")

    def evaluation(self, step: int, metrics: dict[str, float], best: dict | None = None) -> None:
        """The eval tasks' metrics at ``step`` (and the best so far when a metric is tracked)."""
        if not self.main or not metrics:
            return
        self._record({"step": step, "eval": metrics, **({"best": best} if best else {})})
        self.sinks.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        self.bar.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def _record(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def summary(self, record: dict) -> None:
        """The end-of-run record (steps done, samples skipped by cause, ...), after the per-step ones."""
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"summary": record}) + "\n")
        skipped = record.get("skipped") or {}
        self.sinks.scalars(record["steps"], {"data/skipped_samples": float(sum(skipped.values())),
                                             "train/nonfinite_steps": float(record.get("nonfinite_steps", 0))})

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
            self.sinks.close()
            plot_losses(self.metrics_path, self.run_dir / "loss.png")


def truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue  # a line cut short when the run was killed mid-write
        if isinstance(rec, dict) and "summary" not in rec and rec.get("step", 0) <= step:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep))


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
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
