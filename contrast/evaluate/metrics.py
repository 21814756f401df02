"""Metric math over score matrices: retrieval ranks and hit@K, re-ranking of shortlists, classification summaries.

Everything here is a pure function of tensors, so it is tested on small hand-made matrices without a model.

Retrieval follows the CLIP paper's definition (Radford et al., 2021, appendix): a query is *found at K* when any
of its positives is among its top K candidates; recall@K is the fraction of queries found at K. With several
captions per image this makes image-to-text easier than text-to-image (an image has several chances, a caption one).

Tie rule (pessimistic): a query's rank is the number of **non-positive** candidates whose score is **greater than
or equal to** the score of its best positive. So a tie between the best positive and a negative counts against the
query: the negative is placed first. Ranks are 0-based; a query is found at K when ``rank < K``. Positives never
push each other down (the first positive in the list is the one that counts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

RETRIEVAL_DEFINITION = (
    "recall@K (CLIP definition): a query counts as found when any of its positives is among its top K "
    "candidates; ties count against the query (rank = number of non-positive candidates scoring greater than "
    "or equal to its best positive)"
)


def _check_scores(scores: torch.Tensor, positive: torch.Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (queries, candidates) matrix, got shape {tuple(scores.shape)}")
    if positive.shape != scores.shape:
        raise ValueError(
            f"positive mask shape {tuple(positive.shape)} does not match scores shape {tuple(scores.shape)}"
        )
    if positive.dtype != torch.bool:
        raise ValueError(f"positive mask must be a bool tensor, got {positive.dtype}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; check the model outputs (a NaN cannot be ranked)")
    missing = ~positive.any(dim=1)
    if missing.any():
        first = int(missing.nonzero()[0])
        raise ValueError(
            f"{int(missing.sum())} queries have no positive candidate (first: query {first}); every query needs "
            "at least one matching candidate (check the caption-to-image grouping)"
        )


def positive_mask(query_groups: torch.Tensor, candidate_groups: torch.Tensor) -> torch.Tensor:
    """``mask[q, c] = query_groups[q] == candidate_groups[c]``: a (Q, C) bool mask from group ids (e.g. image ids)."""
    return query_groups.reshape(-1, 1) == candidate_groups.reshape(1, -1)  # (Q, C)


def mask_from_lists(positives: Sequence[Sequence[int]], num_candidates: int) -> torch.Tensor:
    """A (Q, C) bool mask from one list of positive candidate indices per query."""
    mask = torch.zeros(len(positives), num_candidates, dtype=torch.bool)
    for q, idx in enumerate(positives):
        if len(idx) == 0:
            raise ValueError(f"query {q} has an empty list of positives")
        mask[q, torch.as_tensor(list(idx), dtype=torch.long)] = True
    return mask


def retrieval_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best positive under the pessimistic tie rule (see the module docstring).

    scores: (Q, C) float, higher is better; positive: (Q, C) bool with at least one True per row. Returns (Q,) long.
    """
    _check_scores(scores, positive)
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    return ((scores >= best) & ~positive).sum(dim=1)  # (Q,)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose rank is below K, for each K."""
    if ranks.numel() == 0:
        raise ValueError("no queries to score")
    return {int(k): float((ranks < k).double().mean()) for k in ks}


def rank_summary(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """recall@K for each K plus the mean and median 1-based rank of the best positive."""
    out = {f"R@{k}": v for k, v in recall_at_k(ranks, ks).items()}
    one_based = ranks.double() + 1
    out["mean_rank"] = float(one_based.mean())
    out["median_rank"] = float(one_based.median())
    return out


def image_text_ranks(
    sim: torch.Tensor, text_to_image: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks in both directions from an (images, texts) similarity matrix.

    ``text_to_image[t]`` is the image index of caption t (several captions may share an image). Returns
    (image_to_text_ranks (I,), text_to_image_ranks (T,)). Work is done in chunks of queries to bound memory.
    """
    n_img, n_txt = sim.shape
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must have one entry per text ({n_txt}), got shape {tuple(text_to_image.shape)}")
    img_ids = torch.arange(n_img)
    i2t = [
        retrieval_ranks(sim[s : s + chunk], positive_mask(img_ids[s : s + chunk], text_to_image))
        for s in range(0, n_img, chunk)
    ]
    t2i = [
        retrieval_ranks(sim[:, s : s + chunk].T, positive_mask(text_to_image[s : s + chunk], img_ids))
        for s in range(0, n_txt, chunk)
    ]
    return torch.cat(i2t), torch.cat(t2i)


# --------------------------------------------------------------------------------------------------- re-ranking


def shortlist(scores: torch.Tensor, k: int, positive: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (Q, k) of each query's k best candidates, best first.

    With ``positive`` given, ties are broken with negatives first, matching the pessimistic tie rule, so a
    positive tied with a negative at the edge of the shortlist is left out.
    """
    k = min(int(k), scores.shape[1])
    if k < 1:
        raise ValueError(f"shortlist size must be at least 1, got {k}")
    order = torch.arange(scores.shape[1]).expand_as(scores)
    if positive is not None:  # stable sort on the tie-breaker first, then on the score
        order = torch.sort(positive.to(torch.int8), dim=1, stable=True).indices  # negatives first
    by_score = torch.sort(scores.gather(1, order), dim=1, descending=True, stable=True).indices
    return order.gather(1, by_score)[:, :k]  # (Q, k)


def rerank(
    scores: torch.Tensor,
    k: int,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    positive: torch.Tensor | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Re-order each query's top-k shortlist by a second scorer (e.g. an ITM head), leaving the rest in place.

    ``score_fn(query_idx (n,), candidate_idx (n,)) -> (n,)`` scores n pairs. Returns a (Q, C) matrix whose ordering
    is: the shortlist, ordered by the new scores, strictly above every other candidate, which keep their original
    order. (The values of the shortlist are the new scores shifted above the row's original maximum.)
    """
    q, c = scores.shape
    top = shortlist(scores, k, positive)  # (Q, k)
    kk = top.shape[1]
    qi = torch.arange(q).repeat_interleave(kk)  # (Q*k,)
    ci = top.reshape(-1)  # (Q*k,)
    new = torch.cat([score_fn(qi[s : s + batch_size], ci[s : s + batch_size]) for s in range(0, q * kk, batch_size)])
    new = new.reshape(q, kk).to(scores.dtype)  # (Q, k)
    if torch.isnan(new).any():
        raise ValueError("the re-ranking scorer returned NaN")
    lift = scores.amax(dim=1, keepdim=True) - new.amin(dim=1, keepdim=True) + 1.0  # (Q, 1)
    out = scores.clone()
    out.scatter_(1, top, new + lift)
    return out


# --------------------------------------------------------------------------------------------------- classification


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> dict:
    """Top-1, top-5 (when there are more than 5 classes), mean per-class recall and the confusion matrix.

    Mean per-class recall averages over the classes that occur in ``labels`` (a class absent from the evaluation
    data has no recall). ``confusion[i][j]`` counts samples of true class i predicted as class j.
    """
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, classes) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    n = num_classes or logits.shape[1]
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n):
        raise ValueError(f"labels must lie in [0, {n}), got range [{int(labels.min())}, {int(labels.max())}]")
    out: dict = {"num_samples": int(labels.numel()), "num_classes": n}
    out["top1"] = float(MulticlassAccuracy(num_classes=n, top_k=1, average="micro")(logits, labels))
    if n > 5:
        out["top5"] = float(MulticlassAccuracy(num_classes=n, top_k=5, average="micro")(logits, labels))
    cm = MulticlassConfusionMatrix(num_classes=n)(logits.argmax(dim=1), labels)  # (true, predicted)
    support = cm.sum(dim=1)
    present = support > 0
    recall = torch.full((n,), float("nan"), dtype=torch.float64)
    recall[present] = cm.diag()[present].double() / support[present].double()
    out["mean_per_class_recall"] = float(recall[present].mean())
    out["per_class_recall"] = [None if torch.isnan(r) else float(r) for r in recall]
    out["confusion"] = cm.tolist()
    return out
