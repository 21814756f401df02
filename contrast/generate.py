"""Answers to a prompt about an image from any decoder model (the vision-language decoder through either bridge,
BLIP-2 stage 2): greedy decoding and beam search over the language model's KV cache, stopping at its end tokens.

The prompt is built by the model's own prompt tokenizer (its LM's tokenizer and chat template, the instruction of
the recipe or one given here), left-padded so every row's answer starts at the same column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contrast.decoders import PromptTokenizer
from contrast.models import Model

MAX_NEW_TOKENS = 32


@dataclass
class Generated:
    ids: list[int]  # the answer's token ids, its end token included when one was produced
    text: str
    logprob: float  # the sum of the answer tokens' log-probabilities


def prompt_batch(tokenizer: PromptTokenizer, pixels: torch.Tensor | dict[str, torch.Tensor],
                 instruction: str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts for ``pixels`` (B, 3, H, W) (or a tiled model's ``{pixels, tile_mask, aspect_ratio_ids}``),
    with ``instruction`` in place of the recipe's when given."""
    if instruction is not None:
        tokenizer = PromptTokenizer(tokenizer.codec, instruction, "auto" if tokenizer.chat else "never",
                                    tokenizer.image_tokens, tokenizer.image_at, tokenizer.max_length)
    images = pixels if isinstance(pixels, dict) else {"pixels": pixels}
    dev = images["pixels"].device
    batch = tokenizer.prompts(images["pixels"].shape[0])
    return {**{k: v.to(dev) for k, v in batch.items()}, **images}


def _cut(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def greedy(model: Model, batch: dict[str, torch.Tensor], max_new_tokens: int = MAX_NEW_TOKENS
           ) -> list[tuple[list[int], float]]:
    """The most likely next token at every step, through the KV cache."""
    eos = torch.tensor(sorted(model.eos_token_ids), device=batch["input_ids"].device)
    logits, state = model.prefill(batch)
    B = logits.shape[0]
    out = torch.zeros(B, 0, dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    score = torch.zeros(B, device=logits.device)
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits, dim=-1)
        best, nxt = logp.max(dim=-1)
        nxt = torch.where(done, eos[0].expand_as(nxt), nxt)
        score += torch.where(done, torch.zeros_like(best), best)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits, state = model.extend(state, nxt)
    return [(_cut(row.tolist(), set(eos.tolist())), float(s)) for row, s in zip(out, score)]


@torch.no_grad()
def greedy_uncached(model: Model, batch: dict[str, torch.Tensor], max_new_tokens: int = MAX_NEW_TOKENS
                    ) -> list[list[int]]:
    """Greedy decoding that reruns the whole sequence at every step (no cache): the reference of the cached path."""
    eos = set(model.eos_token_ids)
    batch = dict(batch)
    B = batch["input_ids"].shape[0]
    new: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        logits, _ = model.prefill(batch)
        nxt = logits.argmax(dim=-1)  # (B,)
        for b in range(B):
            if not (new[b] and new[b][-1] in eos):
                new[b].append(int(nxt[b]))
        if all(n and n[-1] in eos for n in new):
            break
        one = torch.ones(B, 1, dtype=torch.long, device=nxt.device)
        batch["input_ids"] = torch.cat([batch["input_ids"], nxt[:, None]], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], one], dim=1)
        batch["visual_mask"] = torch.cat([batch["visual_mask"], torch.zeros_like(one, dtype=torch.bool)], dim=1)
        batch["image_rows"] = torch.cat([batch["image_rows"], torch.ones_like(one, dtype=torch.bool)], dim=1)
    return new


@torch.no_grad()
def beam_search(model: Model, batch: dict[str, torch.Tensor], beams: int = 3, max_new_tokens: int = MAX_NEW_TOKENS,
                length_penalty: float = 1.0) -> list[tuple[list[int], float]]:
    """Beam search over the KV cache, all prompts and beams in one batch; a finished beam keeps its score, and the
    answer is the beam with the best ``score / length ** length_penalty``."""
    K = beams
    rep = {k: v.repeat_interleave(K, dim=0) for k, v in batch.items()}
    logits, state = model.prefill(rep)
    BK, V = logits.shape
    B, dev = BK // K, logits.device
    eos_ids = sorted(model.eos_token_ids)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # the K copies start alike: keep one so the first step does not pick duplicates
    lengths = torch.zeros(B, K, device=dev)
    done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    ids = torch.zeros(BK, 0, dtype=torch.long, device=dev)
    frozen = torch.full((V,), float("-inf"), device=dev)
    frozen[eos_ids[0]] = 0.0  # a finished beam continues with an end token at no cost
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits, dim=-1).view(B, K, V)
        logp = torch.where(done[:, :, None], frozen, logp)
        scores, flat = (scores[:, :, None] + logp).view(B, K * V).topk(K, dim=1)  # (B, K)
        src, tok = flat // V, flat % V
        rows = (src + torch.arange(B, device=dev)[:, None] * K).view(-1)  # (B*K,)
        was_done = done.gather(1, src)
        lengths = lengths.gather(1, src) + (~was_done).float()
        done = was_done | torch.isin(tok, torch.tensor(eos_ids, device=dev))
        ids = torch.cat([ids[rows], tok.view(-1, 1)], dim=1)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits, state = model.extend(model.reorder(state, rows), tok.view(-1))
    best = (scores / lengths.clamp(min=1) ** length_penalty).argmax(dim=1)  # (B,)
    eos = set(eos_ids)
    return [(_cut(ids[b * K + int(best[b])].tolist(), eos), float(scores[b, best[b]])) for b in range(B)]


def generate(model: Model, tokenizer: PromptTokenizer, pixels: torch.Tensor | dict[str, torch.Tensor],
             instruction: str | None = None,
             beams: int = 1, max_new_tokens: int = MAX_NEW_TOKENS, length_penalty: float = 1.0) -> list[Generated]:
    """Answers for a batch of preprocessed images; ``beams == 1`` is greedy decoding."""
    if not model.supports("decoder"):
        raise ValueError(f"{type(model).__name__} has no language-model decoder; generation needs a model of kind "
                         "decoder or blip2_stage2")
    if beams < 1 or max_new_tokens < 1:
        raise ValueError(f"beams and max_new_tokens must be at least 1, got {beams} and {max_new_tokens}")
    batch = prompt_batch(tokenizer, pixels, instruction)
    found = greedy(model, batch, max_new_tokens) if beams == 1 else beam_search(
        model, batch, beams, max_new_tokens, length_penalty)
    return [Generated(ids, tokenizer.decode(ids), lp) for ids, lp in found]
