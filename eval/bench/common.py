"""Pieces shared by the benchmark scripts in this folder (run as ``python eval/bench/X.py``, which puts this folder
on the import path)."""

from __future__ import annotations

import contextlib
import time

import torch


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """This machine's fp32 matmul FLOP/s: an n^3 matmul, best of ``reps``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a name torch.cuda.get_device_name contains;
# the first match wins (H100 PCIe and NVL before the SXM part's plain "H100")
GPU_BF16_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                  ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12))


def gpu_bf16_peak(name: str) -> float | None:
    """The data-sheet dense bf16 peak of the GPU called ``name`` (torch.cuda.get_device_name), None if not listed."""
    return next((peak for key, peak in GPU_BF16_PEAKS if key in name), None)


def cuda_bf16_matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """This GPU's measured bf16 matmul FLOP/s: an n^3 matmul, best of ``reps`` (for cards not in the table)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def open_clip_trainer(*, embed: int, image_size: int, patch: int, width: int, v_layers: int, heads: int, ctx: int,
                      t_layers: int, precision: str = "fp32", accum_freq: int = 1, device: str = "cpu",
                      text_width: int | None = None, text_heads: int | None = None):
    """open_clip's CLIP of the given size, its ClipLoss and AdamW as its training script sets it up (no weight
    decay on gains, biases and the logit scale; no gradient clipping, its default). ``precision`` "bf16" runs the
    forward and the loss under ``torch.autocast`` bf16 with fp32 weights, as its ``--precision amp_bf16`` does;
    ``accum_freq`` K > 1 splits each batch into K micro-batches as its ``--accum-freq K`` does (see
    ``_accumulating_step``). ``text_width`` / ``text_heads``: the text tower's, where they differ from the image
    tower's; ``device`` "cuda" puts the model there (its AdamW stays torch's default, as in open_clip's script).
    Returns ``(model, step(pixels, ids) -> loss)``."""
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.CLIP(
        embed_dim=embed,
        vision_cfg=dict(image_size=image_size, patch_size=patch, width=width, layers=v_layers, head_width=width // heads),
        text_cfg=dict(context_length=ctx, vocab_size=49408, width=text_width or width, heads=text_heads or heads,
                      layers=t_layers),
    ).to(device)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.1}],
        lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
    )
    loss_fn = ClipLoss()
    amp = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    if accum_freq > 1:
        return model, _accumulating_step(model, loss_fn, opt, amp, accum_freq)

    def step(pixels, ids):
        with amp():
            img, txt, scale = model(pixels, ids)[:3]
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return model, step


def _accumulating_step(model, loss_fn, opt, amp, k: int):
    """One optimizer step over a batch in ``k`` micro-batches the way open_clip's ``train_one_epoch`` does with
    ``accum_freq`` k: embed every micro-batch without gradients and keep the features; then for each micro-batch a
    forward with gradients, the loss over the whole batch with its features put in place of its cached ones, and a
    backward (the logit scale thus gets the sum of k whole-batch gradients, as in open_clip); then one step."""

    def step(pixels, ids):
        chunks = list(zip(pixels.chunk(k), ids.chunk(k)))
        with torch.no_grad(), amp():
            cached = [model(p, t)[:2] for p, t in chunks]
        images, texts = [c[0] for c in cached], [c[1] for c in cached]
        opt.zero_grad(set_to_none=True)
        for j, (p, t) in enumerate(chunks):
            with amp():
                img, txt, scale = model(p, t)[:3]
                loss = loss_fn(torch.cat(images[:j] + [img] + images[j + 1:]),
                               torch.cat(texts[:j] + [txt] + texts[j + 1:]), scale)
            loss.backward()
        opt.step()
        return loss

    return step
