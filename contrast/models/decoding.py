"""What every decoder model shares (the vision-language decoder, BLIP-2 stage 2, the caption-only LM): a
:class:`~contrast.decoders.base.LanguageModel` fed prompted samples, visual inputs either written at the prompt's
placeholder positions (unified embedding, BLIP-2's soft prompt) or read by gated cross-attention before chosen layers,
the loss on the answer's tokens, and incremental decoding with the LM's KV cache for generation.

Training stages are presets over which parameters train (:func:`apply_stage`): ``align`` trains the bridge alone
(the tower and the LM frozen: LLaVA's projector pretraining, prismatic-vlms' "align"), ``finetune`` the bridge and
the LM. Nothing here branches on which LM it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from contrast.config import DecoderConfig
from contrast.decoders import Codec, LanguageModel, LayerHook
from contrast.decoders.lora import attach_lora
from contrast.models.lm import answer_output
from contrast.models.outputs import Model, ModelOutput

STAGES = ("auto", "align", "finetune")


def resolve_stage(stage: str, fresh_lm: bool) -> str:
    """``auto`` -> finetune for a freshly initialised LM (it must learn the language), align for a pretrained one."""
    if stage not in STAGES:
        raise ValueError(f"the decoder's stage must be one of {', '.join(STAGES)}, got '{stage}'")
    return ("finetune" if fresh_lm else "align") if stage == "auto" else stage


def splice(x: torch.Tensor, visual: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, W) with its placeholder run ``where`` (B, T) replaced by ``visual`` (B, N, W), without a host
    synchronisation (the run's start is an argmax); on the CPU a count mismatch is an error naming both."""
    N = visual.shape[1]
    if x.device.type == "cpu":
        counts = where.sum(dim=1)
        if bool((counts != N).any()):
            bad = int(counts[counts != N][0])
            raise ValueError(f"the prompt holds {bad} image placeholder positions but the bridge gives {N} visual "
                             "tokens; build prompts with the model's own tokenizer (its image_tokens must equal them)")
    else:
        torch._assert_async((where.sum(dim=1) == N).all(), "image placeholders != visual tokens")
    start = where.long().argmax(dim=1, keepdim=True)  # (B, 1) first placeholder
    slot = (torch.arange(x.shape[1], device=x.device)[None] - start).clamp(0, N - 1)  # (B, T)
    picked = visual.gather(1, slot[..., None].expand(-1, -1, visual.shape[-1]))  # (B, T, W)
    return torch.where(where[..., None], picked.to(x.dtype), x)


@dataclass
class DecodeState:
    """Incremental decoding: the LM's cache, the attention mask so far and the cross-attention context."""

    cache: Any
    attention_mask: torch.Tensor  # (B, past)
    context: torch.Tensor | None  # (B, N, W) cross-attention context (xattn), None otherwise
    rows: torch.Tensor  # (B, past) the positions that may attend to the image
    context_mask: torch.Tensor | None = None  # (B, N) real context positions (tiled images), None: all


class DecoderModel(Model):
    """A language model with optional visual input. Subclasses set ``lm``, ``codec`` and implement
    :meth:`visual_input` (and :meth:`cross_hook` for cross-attention)."""

    lm: LanguageModel
    codec: Codec
    splices = True  # visual inputs are written at placeholder positions (False: read by cross-attention)

    def set_stage(self, d: DecoderConfig, fresh_lm: bool) -> bool:
        """Apply the decoder's stage preset to the LM: ``align`` freezes it, ``finetune`` trains it, or with
        ``lora_rank`` > 0 freezes it and trains low-rank adapters (``self.lora``). Returns whether the LM's own
        weights are frozen."""
        self.stage = resolve_stage(d.stage, fresh_lm)
        if d.lora_rank and self.stage != "finetune":
            raise ValueError(f"the decoder's lora_rank is for the finetune stage; this one is {self.stage} (set the "
                             "decoder's stage: finetune, or lora_rank: 0)")
        frozen = self.stage == "align" or d.lora_rank > 0
        if frozen:
            self.lm.requires_grad_(False)
        self.lora = attach_lora(self.lm, d.lora_rank, d.lora_alpha, list(d.lora_targets)) if d.lora_rank > 0 \
            else nn.ModuleDict()
        return frozen

    def visual_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, N, W): the visual tokens / soft prompt / cross-attention context of the batch's images, or None."""
        return None

    def context_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, N) bool: the cross-attention context positions that are real (tiled images: not padding), or None."""
        return None

    def cross_hook(self, context: torch.Tensor, context_mask: torch.Tensor | None, rows: torch.Tensor
                   ) -> LayerHook | None:
        return None

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, LayerHook | None, torch.Tensor | None,
                                                               torch.Tensor | None]:
        x = self.lm.embed(batch["input_ids"])  # (B, T, W)
        visual = self.visual_input(batch)
        if visual is None:
            return x, None, None, None
        if self.splices:
            return splice(x, visual, batch["visual_mask"]), None, None, None
        cmask = self.context_mask(batch)
        return x, self.cross_hook(visual, cmask, batch["image_rows"]), visual, cmask

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        x, hook, _, _ = self._inputs(batch)
        h, _ = self.lm.hidden(x, batch["attention_mask"], hook)
        return ModelOutput(lm=answer_output(h, batch["labels"], self.lm.logits))

    def text_only(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        """The same loss with the image path off: placeholder positions masked out (the LM sees the prompt's text
        alone, at the positions it would have without them) and no cross-attention."""
        mask = batch["attention_mask"] * (~batch["visual_mask"]).long()
        h, _ = self.lm.hidden(self.lm.embed(batch["input_ids"]), mask)
        return ModelOutput(lm=answer_output(h, batch["labels"], self.lm.logits))

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def prefill(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, DecodeState]:
        """Run the (left-padded) prompts; returns the next-token logits (B, V) and the state to extend."""
        x, hook, context, cmask = self._inputs(batch)
        mask = batch["attention_mask"]
        h, cache = self.lm.hidden(x, mask, hook, use_cache=True)
        return self.lm.logits(h[:, -1]).float(), DecodeState(cache, mask, context, batch["image_rows"], cmask)

    @torch.no_grad()
    def extend(self, state: DecodeState, ids: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Feed one token per row (B,); returns the next logits (B, V) and the extended state."""
        ones = torch.ones_like(ids)[:, None]
        mask = torch.cat([state.attention_mask, ones], dim=1)
        rows = torch.cat([state.rows, ones.bool()], dim=1)
        hook = self.cross_hook(state.context, state.context_mask, rows) if state.context is not None else None
        h, cache = self.lm.hidden(self.lm.embed(ids[:, None]), mask, hook, cache=state.cache, use_cache=True)
        return self.lm.logits(h[:, -1]).float(), DecodeState(cache, mask, state.context, rows, state.context_mask)

    def reorder(self, state: DecodeState, rows: torch.Tensor) -> DecodeState:
        """The state of batch rows ``rows`` (beam search keeps the best continuations)."""
        ctx = state.context[rows] if state.context is not None else None
        cmask = state.context_mask[rows] if state.context_mask is not None else None
        return DecodeState(self.lm.reorder_cache(state.cache, rows), state.attention_mask[rows], ctx, state.rows[rows],
                           cmask)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((*self.lm.eos_token_ids, self.codec.eos_id)))


def check_trainable(model: nn.Module, what: str) -> None:
    """A stage preset that leaves nothing to train is an error naming the settings that froze everything."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{what} leaves no parameter to train (the tower and the language model are frozen and the "
                         "bridge has none); set the decoder's stage: finetune or unlock the tower")


def null_prompt(n: int, width: int, std: float) -> nn.Parameter:
    """A learned prompt of ``n`` tokens that carries no image content: the reference a visual bridge must beat."""
    return nn.Parameter(torch.randn(n, width) * std)
