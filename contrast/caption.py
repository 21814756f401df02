"""Image captioning with BLIP's image-grounded decoder: greedy and beam search, and ``contrast caption``.

Reference: Li et al., "BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language Understanding and
Generation", 2022 (captions are decoded from the LM head, beam search with 3 beams in the paper's evaluation).

A captioner is any :class:`~contrast.models.Model` with the ``caption`` capability: ``image_tokens(pixels) ->
(B, N, D)`` and ``lm_logits(ids, image_tokens, valid=...) -> (B, T, V)`` whose position 0 is the decoder's start
token (the model replaces it by its [DEC] token). Decoding stops at the tokenizer's end-of-text token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contrast.models import Model

MAX_CAPTION_TOKENS = 30  # most tokens per generated caption, start token included


@dataclass
class Caption:
    ids: list[int]  # generated token ids, end-of-text included when it was produced
    text: str
    logprob: float  # sum of the generated tokens' log-probabilities


def _banned(model: Model, sot_id: int) -> list[int]:
    """Ids the decoder may never emit: the start-of-text token and the model's own mode tokens."""
    return [sot_id, *model.special_token_ids]


def _next_logprobs(model, ids: torch.Tensor, image_tokens: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """Log-probabilities (B, V) of the token after ``ids`` (B, t)."""
    valid = torch.ones_like(ids, dtype=torch.bool)
    logits = model.lm_logits(ids, image_tokens, valid=valid)[:, -1].float()  # (B, V)
    logits[:, banned] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def greedy(model, pixels: torch.Tensor, sot_id: int, eot_id: int, max_length: int = MAX_CAPTION_TOKENS) -> list[tuple[list[int], float]]:
    """The most likely next token at every step, for each image of ``pixels`` (B, 3, H, W)."""
    tokens = model.image_tokens(pixels)  # (B, N, D)
    B = tokens.shape[0]
    banned = _banned(model, sot_id)
    ids = torch.full((B, 1), sot_id, dtype=torch.long, device=tokens.device)
    done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    score = torch.zeros(B, device=tokens.device)
    for _ in range(max_length - 1):
        logp = _next_logprobs(model, ids, tokens, banned)
        best, nxt = logp.max(dim=-1)
        score += torch.where(done, torch.zeros_like(best), best)
        nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eot_id
        if bool(done.all()):
            break
    return [(_strip(row[1:].tolist(), eot_id), float(s)) for row, s in zip(ids, score)]


@torch.no_grad()
def beam_search(
    model,
    pixels: torch.Tensor,
    sot_id: int,
    eot_id: int,
    beams: int = 3,
    max_length: int = MAX_CAPTION_TOKENS,
    length_penalty: float = 1.0,
) -> list[tuple[list[int], float]]:
    """Beam search over the decoder, all images and beams in one batch.

    Beams are ranked by their summed log-probability while they grow; a finished beam (it produced end-of-text)
    keeps its score. The returned caption is the beam with the best ``score / length ** length_penalty``.
    """
    tokens = model.image_tokens(pixels)  # (B, N, D)
    B, K = tokens.shape[0], beams
    banned = _banned(model, sot_id)
    dev = tokens.device
    tokens = tokens.repeat_interleave(K, dim=0)  # (B*K, N, D)
    ids = torch.full((B * K, 1), sot_id, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
    lengths = torch.zeros(B, K, device=dev)
    done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    for _ in range(max_length - 1):
        logp = _next_logprobs(model, ids, tokens, banned)  # (B*K, V)
        V = logp.shape[-1]
        logp = logp.view(B, K, V)
        # a finished beam can only continue with end-of-text, at no cost
        frozen = torch.full((V,), float("-inf"), device=dev)
        frozen[eot_id] = 0.0
        logp = torch.where(done[:, :, None], frozen, logp)
        cand = (scores[:, :, None] + logp).view(B, K * V)  # (B, K*V)
        scores, flat = cand.topk(K, dim=1)  # (B, K)
        src, tok = flat // V, flat % V  # source beam and new token, (B, K)
        rows = (src + torch.arange(B, device=dev)[:, None] * K).view(-1)  # (B*K,)
        was_done = done.gather(1, src)
        lengths = lengths.gather(1, src) + (~was_done).float()
        done = was_done | (tok == eot_id)
        ids = torch.cat([ids[rows], tok.view(-1, 1)], dim=1)
        if bool(done.all()):
            break
    final = scores / lengths.clamp(min=1) ** length_penalty
    best = final.argmax(dim=1)  # (B,)
    out = []
    for b in range(B):
        row = ids[b * K + int(best[b]), 1:].tolist()
        out.append((_strip(row, eot_id), float(scores[b, best[b]])))
    return out


def _strip(ids: list[int], eot_id: int) -> list[int]:
    """Cut a generated sequence after its first end-of-text token."""
    return ids[: ids.index(eot_id) + 1] if eot_id in ids else ids


def caption_images(
    model, tokenizer, pixels: torch.Tensor, beams: int = 1, max_length: int = MAX_CAPTION_TOKENS, length_penalty: float = 1.0
) -> list[Caption]:
    """Captions for a batch of preprocessed images; ``beams == 1`` is greedy decoding."""
    if not model.supports("caption"):
        raise ValueError(f"{type(model).__name__} has no captioning decoder; captioning needs a model of kind blip")
    if beams < 1:
        raise ValueError(f"beams must be at least 1, got {beams}")
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    max_length = min(max_length, model.context_length)
    if beams == 1:
        found = greedy(model, pixels, sot, eot, max_length)
    else:
        found = beam_search(model, pixels, sot, eot, beams, max_length, length_penalty)
    return [Caption(ids=ids, text=tokenizer.decode(ids), logprob=lp) for ids, lp in found]
