"""One evaluation report per run: ``report.json`` (every figure), ``report.md`` (tables) and plots, in one folder.

A report is a list of sections, each the result dict of one evaluation (zero-shot, retrieval, linear probe) with
its kind and name. Plots are drawn with matplotlib's Agg canvas directly, so no display and no global pyplot state
are involved: a confusion matrix per classification section, the regularisation sweep of a linear probe and the
recall@K bars of a retrieval section.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("zeroshot", "retrieval", "linear_probe")


@dataclass
class Section:
    kind: str  # zeroshot | retrieval | linear_probe
    name: str  # task or data name
    result: dict[str, Any]
    plots: list[str] = field(default_factory=list)  # file names inside the report folder

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"report section kind must be one of {KINDS}, got '{self.kind}'")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "section"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_confusion(confusion: list[list[int]], classnames: list[str] | None, path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class down, predicted across); counts written in the cells when small."""
    import numpy as np

    cm = np.asarray(confusion, dtype=np.float64)
    n = cm.shape[0]
    names = list(classnames) if classnames and len(classnames) == n else [str(i) for i in range(n)]
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(max(4.0, 0.45 * n + 2.0), 30.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_sweep(sweep: list[dict[str, float]], best_l2: float, path: str | Path, title: str = "") -> Path:
    """Validation accuracy against the L2 strength of a linear probe's sweep."""
    pts = sorted((s["l2"], s["val_accuracy"]) for s in sweep)
    fig = _figure(5.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.axvline(best_l2, color="grey", linestyle="--", label=f"best l2 = {best_l2:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("L2 strength")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title or "linear probe sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_recall(result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """recall@K bars for both retrieval directions (embedding similarity, and ITM re-ranked when present)."""
    series = [("image→text", result["image_to_text"]), ("text→image", result["text_to_image"])]
    if "itm_reranked" in result:
        series += [("image→text ITM", result["itm_reranked"]["image_to_text"]),
                   ("text→image ITM", result["itm_reranked"]["text_to_image"])]
    ks = [k for k in result["image_to_text"] if k.startswith("R@")]
    fig = _figure(5.5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for s, (label, summary) in enumerate(series):
        ax.bar([i + s * width for i in range(len(ks))], [summary[k] for k in ks], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ks))], ks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.set_title(title or "retrieval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# --------------------------------------------------------------------------------------------------- markdown


def _classification_rows(kind: str, sections: list[Section]) -> str:
    if kind == "zeroshot":
        header = ["task", "images", "classes", "top-1", "top-5", "mean per-class recall", "chance top-1"]
        rows = [[s.name, s.result.get("n", s.result.get("num_samples")), s.result.get("classes", s.result.get("num_classes")),
                 s.result.get("top1"), s.result.get("top5"), s.result.get("mean_per_class_recall"),
                 s.result.get("chance_top1")] for s in sections]
    else:
        header = ["task", "features", "train / val / test", "best L2", "val accuracy", "test accuracy",
                  "test mean per-class recall"]
        rows = [[s.name, s.result.get("features"),
                 f"{s.result.get('num_train')} / {s.result.get('num_val')} / {s.result.get('num_test')}",
                 s.result.get("best_l2"), s.result.get("val_accuracy"), s.result.get("test_accuracy"),
                 s.result.get("test", {}).get("mean_per_class_recall")] for s in sections]
    return _table(header, rows)


def _retrieval_md(s: Section) -> str:
    r = s.result
    ks = [k for k in r["image_to_text"] if k.startswith("R@")]
    header = ["direction", *ks, "mean rank", "median rank"]
    rows = []
    for label, summary in (("image → text", r["image_to_text"]), ("text → image", r["text_to_image"])):
        rows.append([label, *[summary[k] for k in ks], summary["mean_rank"], summary["median_rank"]])
    if "itm_reranked" in r:
        k = r["itm_reranked"]["shortlist"]
        for label, summary in (("image → text, ITM re-ranked", r["itm_reranked"]["image_to_text"]),
                               ("text → image, ITM re-ranked", r["itm_reranked"]["text_to_image"])):
            rows.append([f"{label} (top {k})", *[summary[k_] for k_ in ks], summary["mean_rank"],
                         summary["median_rank"]])
    meta = f"{r.get('num_images')} images, {r.get('num_texts')} captions (grouped by {r.get('captions_grouped_by')})."
    return "\n\n".join([f"### {s.name}", meta, _table(header, rows), f"_{r.get('definition', '')}_"])


def to_markdown(sections: list[Section], title: str = "Evaluation report", meta: dict[str, Any] | None = None) -> str:
    parts = [f"# {title}"]
    if meta:
        parts.append("\n".join(f"- {k}: {_fmt(v)}" for k, v in meta.items()))
    names = {"zeroshot": "Zero-shot classification", "retrieval": "Retrieval", "linear_probe": "Linear probe"}
    for kind in KINDS:
        group = [s for s in sections if s.kind == kind]
        if not group:
            continue
        parts.append(f"## {names[kind]}")
        if kind == "retrieval":
            parts += [_retrieval_md(s) for s in group]
        else:
            parts.append(_classification_rows(kind, group))
        plots = [p for s in group for p in s.plots]
        if plots:
            parts.append("\n".join(f"![{Path(p).stem}]({p})" for p in plots))
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------- writing


def write_report(
    out_dir: str | Path,
    sections: list[Section],
    *,
    checkpoint: str | None = None,
    title: str = "Evaluation report",
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    used: set[str] = set()
    for s in sections:
        s.plots = []
        base = _slug(f"{s.kind}_{s.name}")
        while base in used:
            base += "_"
        used.add(base)
        if not plots:
            continue
        metrics = s.result.get("test", s.result)  # a linear probe keeps its classification figures under "test"
        if "confusion" in metrics:
            p = plot_confusion(metrics["confusion"], metrics.get("classnames"), out / f"{base}_confusion.png",
                               f"{s.name}: confusion matrix")
            s.plots.append(p.name)
        if s.kind == "linear_probe" and s.result.get("sweep"):
            p = plot_sweep(s.result["sweep"], s.result["best_l2"], out / f"{base}_sweep.png", f"{s.name}: L2 sweep")
            s.plots.append(p.name)
        if s.kind == "retrieval":
            p = plot_recall(s.result, out / f"{base}_recall.png", f"{s.name}: recall@K")
            s.plots.append(p.name)
        written.update({Path(p).stem: out / p for p in s.plots})
    meta = {"created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
    if checkpoint is not None:
        meta["checkpoint"] = str(checkpoint)
    doc = {**meta, "sections": [{"kind": s.kind, "name": s.name, "plots": s.plots, "result": s.result} for s in sections]}
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(to_markdown(sections, title, meta))
    written["json"] = out / "report.json"
    written["markdown"] = out / "report.md"
    return written


def _json_default(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"cannot write {type(v).__name__} to a JSON report")


def read_report(path: str | Path) -> list[Section]:
    """The sections of a written report (``report.json`` or its folder)."""
    p = Path(path)
    doc = json.loads((p / "report.json" if p.is_dir() else p).read_text())
    return [Section(s["kind"], s["name"], s["result"], s.get("plots", [])) for s in doc["sections"]]
