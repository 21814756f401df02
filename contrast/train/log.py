"""What a run writes as it trains: ``metrics.jsonl`` (one JSON object per logged step), the progress bar and
``loss.png`` at the end. Only the main process writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class RunLog:
    def __init__(self, run_dir: Path, steps: int, start: int, main: bool, progress: bool):
        self.run_dir, self.main = run_dir, main
        self.metrics_path = run_dir / "metrics.jsonl"
        if main and start:
            truncate_metrics(self.metrics_path, start)  # a resumed run rewrites the steps after its checkpoint
        self.file = open(self.metrics_path, "a") if main else None
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
        rec.update(extra or {})
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{loss:.3f}", scale=f"{rec.get('logit_scale', 0):.1f}", img_s=f"{ips:.0f}")

    def summary(self, record: dict) -> None:
        """The end-of-run record (steps done, samples skipped by cause, ...), after the per-step ones."""
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"summary": record}) + "\n")

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
            plot_losses(self.metrics_path, self.run_dir / "loss.png")


def truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and "summary" not in json.loads(ln) and json.loads(ln).get("step", 0) <= step]
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
