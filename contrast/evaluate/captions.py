"""Held-out caption loss of a decoder model: the mean negative log-likelihood (nats per token) of the answer's
tokens given the image and the prompt, over a captioned split; with ``images=False`` the same with the image path
off (the LM given the prompt alone), so the difference is what the images add on that data.

Rows are read in order, decoded through :class:`~contrast.data.decode.SampleReader` (bad images and empty captions
skipped and counted, or a stop under ``data.strict``), at most ``limit`` of them; nothing per sample is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from contrast.data.collate import stack_images
from contrast.data.decode import SampleReader, describe_cell
from contrast.evaluate.retrieval import undecoded
from contrast.models import Model


def caption_rows(dataset: Any) -> Iterable[dict]:
    """The rows of a table (a ``datasets.Dataset``), images left undecoded."""
    return iter(undecoded(dataset))


def caption_batches(rows: Iterable[dict], preprocess: Callable, tokenizer: Callable, reader: SampleReader,
                    batch_size: int = 32, limit: int = 0) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of ``{pixels, input_ids, attention_mask, labels, ...}`` from the usable ones among the first ``limit``
    rows (0: all) of ``rows``: a table's (:func:`caption_rows`) or a shard split's, streamed; nothing is listed."""
    pixels, captions = [], []
    for n, row in enumerate(rows):
        if limit and n >= limit:
            break
        cap = row.get("caption")
        if isinstance(cap, list | tuple):
            cap = cap[0] if cap else None
        text = reader.caption(cap, f"row {n}")
        img = reader.image(row.get("image"), describe_cell(row.get("image"), n)) if text is not None else None
        if img is not None:
            pixels.append(preprocess(img))
            captions.append(text)
        if len(captions) == batch_size:
            yield {**tokenizer(captions), **stack_images(pixels)}
            pixels, captions = [], []
    if captions:
        yield {**tokenizer(captions), **stack_images(pixels)}


@torch.no_grad()
def caption_loss(model: Model, batches: Iterable[dict[str, torch.Tensor]], device: str | torch.device = "cpu",
                 images: bool = True) -> dict[str, float]:
    """``{nats_per_token, tokens, captions}`` of the answers in ``batches`` (summed over tokens, no smoothing)."""
    if not model.supports("decoder"):
        raise ValueError(f"{type(model).__name__} has no language-model decoder; the caption loss needs a model of "
                         "kind decoder, blip2_stage2 or caption_lm")
    was = model.training
    model.eval()
    total, tokens, captions = torch.zeros((), dtype=torch.float64), 0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch) if images else model.text_only(batch)
            total += F.cross_entropy(out.lm.logits.float(), out.lm.targets, reduction="sum").double().cpu()
            tokens += int(out.lm.targets.numel())
            captions += int(batch["input_ids"].shape[0])
    finally:
        model.train(was)
    if tokens == 0:
        raise ValueError("no usable captions in the evaluation data (every row was skipped)")
    return {"nats_per_token": float(total) / tokens, "tokens": float(tokens), "captions": float(captions)}
