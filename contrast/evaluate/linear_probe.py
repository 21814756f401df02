"""Linear probe: multinomial logistic regression on frozen image features, L2 strength chosen on a validation split.

Protocol after Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021),
appendix A.3: features from the frozen image tower, an L2-regularised logistic regression, its strength swept on a
validation split, test accuracy reported at the best strength.

The objective is ``mean cross-entropy + (l2 / 2) * ||W||^2`` (the bias is not penalised), minimised full-batch with
L-BFGS in float64 on standardised features (mean and standard deviation of the training features). It is the same
problem as scikit-learn's ``LogisticRegression(C=1 / (l2 * n_train))``. The sweep goes from the strongest to the
weakest penalty, warm-starting each fit from the previous one; on equal validation accuracy the stronger penalty wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from contrast.data.decode import SampleReader, describe_cell
from contrast.evaluate.metrics import classification_metrics
from contrast.evaluate.retrieval import undecoded

DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-6, 3))  # 1e-6 ... 1e2


@dataclass
class LogisticModel:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,) feature standardisation
    std: torch.Tensor  # (D,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(self.weight.dtype) - self.mean) / self.std  # (N, D)
        return z @ self.weight.T + self.bias  # (N, C)


@dataclass
class ProbeResult:
    best_l2: float
    val_accuracy: float  # at best_l2
    test_accuracy: float  # at best_l2
    sweep: list[dict[str, float]]  # [{"l2": ..., "val_accuracy": ...}], strongest penalty first
    test: dict[str, Any] = field(default_factory=dict)  # classification_metrics on the test split
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    feature_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 500,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
    tol: float = 1e-7,
) -> LogisticModel:
    """Minimise mean cross-entropy + (l2 / 2) ||W||^2 over (W, b) with full-batch L-BFGS (float64)."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if l2 < 0:
        raise ValueError(f"l2 must be non-negative, got {l2}")
    x = x.double()
    if standardize is None:
        mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    else:
        mean, std = standardize
    z = (x - mean) / std  # (N, D)
    d = z.shape[1]
    w = torch.zeros(num_classes, d, dtype=torch.float64) if init is None else init[0].detach().clone()
    b = torch.zeros(num_classes, dtype=torch.float64) if init is None else init[1].detach().clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = y.long()
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=tol, tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticModel(w.detach(), b.detach(), mean, std)


def _accuracy(model: LogisticModel, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.logits(x).argmax(dim=1) == y.long()).double().mean())


def split_validation(n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of range(n) into (train_idx, val_idx) with ``round(n * fraction)`` validation rows."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"{n} training rows are too few to hold out a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def probe_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    *,
    num_classes: int | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 500,
    classnames: Sequence[str] | None = None,
) -> ProbeResult:
    """Sweep the L2 strength on the validation split (held out of train when none is given); test at the best."""
    if val_x is None:
        tr, va = split_validation(train_x.shape[0], val_fraction, seed)
        train_x, train_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
    assert val_y is not None
    if not l2_grid:
        raise ValueError("the L2 grid is empty")
    n_cls = num_classes or int(max(train_y.max(), val_y.max(), test_y.max())) + 1
    x64 = train_x.double()
    stats = (x64.mean(dim=0), x64.std(dim=0).clamp_min(1e-6))
    sweep, best, best_acc, best_l2, init = [], None, -1.0, 0.0, None
    for l2 in sorted((float(v) for v in l2_grid), reverse=True):  # strongest penalty first
        model = fit_logistic(train_x, train_y, n_cls, l2, max_iter=max_iter, init=init, standardize=stats)
        init = (model.weight, model.bias)
        acc = _accuracy(model, val_x, val_y)
        sweep.append({"l2": l2, "val_accuracy": acc})
        if acc > best_acc:
            best, best_acc, best_l2 = model, acc, l2
    assert best is not None
    test = classification_metrics(best.logits(test_x).float(), test_y.long(), n_cls)
    if classnames is not None:
        test["classnames"] = list(classnames)
    return ProbeResult(
        best_l2=best_l2, val_accuracy=best_acc, test_accuracy=test["top1"], sweep=sweep, test=test,
        num_train=int(train_x.shape[0]), num_val=int(val_x.shape[0]), num_test=int(test_x.shape[0]),
        feature_dim=int(train_x.shape[1]),
    )


# --------------------------------------------------------------------------------------------------- model side


@torch.no_grad()
def extract_features(
    model: Any,
    preprocess: Callable,
    dataset: Any,
    image_column: str = "image",
    *,
    features: str = "pooled",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    reader: SampleReader | None = None,
) -> torch.Tensor:
    """Frozen image features (N, D): ``pooled`` = the image tower's pooled output before the projection (the
    representation a downstream model consumes), ``embed`` = the projected embedding, unnormalised (averaged over
    queries for models with several embeddings per image). Unreadable images are left out (counted in
    ``reader.skips``); :func:`feature_rows` also says which rows were kept."""
    return feature_rows(model, preprocess, dataset, image_column, features=features, batch_size=batch_size,
                        device=device, reader=reader)[0]


@torch.no_grad()
def feature_rows(
    model: Any,
    preprocess: Callable,
    dataset: Any,
    image_column: str = "image",
    *,
    rows: Sequence[int] | None = None,
    features: str = "pooled",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    reader: SampleReader | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Features (N, D) of the readable images among ``rows`` (default: all) and the row numbers they belong to."""
    if features not in ("pooled", "embed"):
        raise ValueError(f"features must be 'pooled' or 'embed', got '{features}'")
    if image_column not in dataset.column_names:
        raise ValueError(f"no image column '{image_column}' in the data (columns: {', '.join(dataset.column_names)})")
    reader = reader if reader is not None else SampleReader()
    dataset = undecoded(dataset, image_column)
    rows = list(range(len(dataset))) if rows is None else list(rows)
    out, kept = [], []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        pixels = []
        for row, cell in zip(chunk, dataset.select(chunk)[image_column]):
            img = reader.image(cell, describe_cell(cell, row))
            if img is not None:
                pixels.append(preprocess(img))
                kept.append(row)
        if pixels:
            out.append(_features(model, torch.stack(pixels).to(device), features))  # (b, D)
    if not out:
        raise ValueError(f"no readable images in the data ({reader.skips.summary()})")
    return torch.cat(out), kept


def _features(model: Any, pixels: torch.Tensor, features: str) -> torch.Tensor:
    if features == "pooled":
        tower = model.image_tower
        return tower.pool(tower.forward_tokens(pixels)).float().cpu()
    f = model.encode_image(pixels, normalize=False)
    if f.ndim == 3:  # (b, Q, E) query embeddings
        f = f.mean(dim=1)
    return f.float().cpu()


def label_indices(values: Sequence[Any], classnames: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Labels as class indices. Integers pass through; strings map onto ``classnames`` (or their sorted set)."""
    values = list(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        names = list(classnames) if classnames else [str(i) for i in range(max(values) + 1)]
        return torch.tensor(values, dtype=torch.long), names
    names = list(classnames) if classnames else sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the task's class names {names[:10]}; fix the task file")
    return torch.tensor([index[str(v)] for v in values], dtype=torch.long), names


def evaluate_linear_probe(
    model: Any,
    preprocess: Callable,
    train: Any,
    test: Any,
    val: Any | None = None,
    *,
    label_column: str = "label",
    image_column: str = "image",
    classnames: Sequence[str] | None = None,
    features: str = "pooled",
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    reader: SampleReader | None = None,
) -> dict[str, Any]:
    """Linear probe of ``model``'s frozen image features on labelled datasets (datasets.Dataset splits).

    Without ``val``, ``val_fraction`` of ``train`` is held out for the sweep. Rows whose label is missing or damaged,
    or whose image cannot be read, are left out and counted under ``skipped`` ({cause: n}) by ``reader`` (default:
    skip and count). Returns :class:`ProbeResult` as a dict plus the feature kind.
    """
    splits = {role: ds for role, ds in (("train", train), ("test", test), ("val", val)) if ds is not None}
    for name, ds in splits.items():
        if label_column not in ds.column_names:
            raise ValueError(
                f"{name} split has no label column '{label_column}' (columns: {', '.join(ds.column_names)}); "
                "set label_column in the task file"
            )
    if classnames is None:
        classnames = getattr(train.features.get(label_column), "names", None)
    reader = reader if reader is not None else SampleReader()
    labels = {role: _usable_labels(ds[label_column], role, reader) for role, ds in splits.items()}
    if not labels["train"]:
        raise ValueError(f"no training row has a usable label in column '{label_column}' ({reader.skips.summary()})")
    # the task's class names, else those of the training labels (checked against the names once images are read)
    names = list(classnames) if classnames is not None else label_indices(list(labels["train"].values()))[1]
    was_training = model.training
    model.eval()
    try:
        kw = dict(image_column=image_column, features=features, batch_size=batch_size, device=device, reader=reader)
        xy = {role: _labelled_features(model, preprocess, ds, labels[role], names, kw) for role, ds in splits.items()}
    finally:
        if was_training:
            model.train()
    result = probe_features(
        *xy["train"], *xy["test"], *xy.get("val", (None, None)), num_classes=len(names), l2_grid=l2_grid,
        val_fraction=val_fraction, seed=seed, classnames=names,
    )
    out = result.to_dict()
    out["features"] = features
    out["skipped"] = reader.skips.as_dict()
    return out


def _usable_labels(values: Sequence[Any], role: str, reader: SampleReader) -> dict[int, Any]:
    """``{row: label}`` of the rows whose label can name a class (the others are counted by ``reader``)."""
    out = {}
    for row, value in enumerate(values):
        label = reader.label(value, f"row {row} of the {role} split")
        if label is not None:
            out[row] = label
    return out


def _labelled_features(model: Any, preprocess: Callable, ds: Any, labels: dict[int, Any], names: list[str],
                       kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), class indices (N,)) of the rows with a usable label and a readable image."""
    x, kept = feature_rows(model, preprocess, ds, rows=list(labels), **kw)
    return x, label_indices([labels[r] for r in kept], names)[0]
