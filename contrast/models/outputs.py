"""What models return and what their consumers may rely on: typed outputs and the :class:`Model` protocol.

Every family returns one :class:`ModelOutput`; a loss term reads the parts it needs (``out.lm``, ``out.itm``, the
embeddings) and names the missing part when a recipe asks a model for a loss it does not produce. Evaluators, export,
the index, the linear probe and captioning take a :class:`Model` and ask its declared capabilities
(``model.capabilities``), never its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from contrast.errors import UserError
from contrast.objectives import Comm
from contrast.towers import ImageTower


@dataclass
class LMOutput:
    """Packed next-token predictions: logits only at the P positions whose next token is a real caption token."""

    logits: torch.Tensor  # (P, V)
    targets: torch.Tensor  # (P,) the next token at each of those positions
    rows: torch.Tensor  # (P,) the caption (row of the batch) each position belongs to
    num_captions: int  # B: the loss averages per caption, then over captions


@dataclass
class ITMOutput:
    """Image-text matching over positives and hard negatives."""

    logits: torch.Tensor  # (3B, 2): positives, (image, hard-negative text), (hard-negative image, text)
    labels: torch.Tensor  # (3B,) 1 for a match
    neg_text: torch.Tensor | None = None  # (B,) index into the global batch of each image's negative caption
    neg_image: torch.Tensor | None = None  # (B,) index into the global batch of each caption's negative image


@dataclass
class TeacherFeatures:
    """A momentum teacher's features of the global batch (rank order) followed by its feature queue (ALBEF, BLIP)."""

    image_emb: torch.Tensor  # (N + Q, E)
    text_emb: torch.Tensor  # (N + Q, E)


@dataclass
class ModelOutput:
    """One training forward of any family; parts a family does not produce stay None."""

    image_emb: torch.Tensor | None = None  # (B, E) or (B, Q, E) for query-based models, L2-normalised
    text_emb: torch.Tensor | None = None  # (B, E), L2-normalised
    logit_scale: torch.Tensor | None = None  # scalar multiplier (exp of the learned log-scale, clamped)
    logit_bias: torch.Tensor | None = None  # scalar, SigLIP
    teacher: TeacherFeatures | None = None
    itm: ITMOutput | None = None
    lm: LMOutput | None = None
    pair_ids: torch.Tensor | None = None  # (B, K) int64, passed through: pairs whose ids agree are positives


class CapabilityError(UserError, NotImplementedError):
    """A model was asked for something its family does not do (see :attr:`Model.capabilities`)."""


class Model(nn.Module):
    """The protocol every model family implements; consumers use nothing else.

    Every family implements ``forward(batch) -> ModelOutput`` and ``image_tower`` (when it has one).
    ``capabilities`` declares the optional parts: ``"embed"`` (encode_image / encode_text / similarity),
    ``"itm"`` (itm_score), ``"caption"`` (image_tokens / lm_logits / special_token_ids / context_length),
    ``"bridge"`` (bridge_state), ``"decoder"`` (a language model reading prompts: text_tokenizer, prefill / extend /
    reorder for generation). A part a family does not declare answers with :class:`CapabilityError` naming it.
    ``comm`` is the cross-process context (a gather and this rank) the loop hands every model.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({"embed"})
    rebuilt_prefixes: tuple[str, ...] = ()  # frozen parts rebuilt from the config's files on load: not checkpointed

    def __init__(self) -> None:
        super().__init__()
        self.comm = Comm()

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def set_comm(self, comm: Comm) -> None:
        """Cross-process context for forwards that need the global batch (BLIP's hard negatives)."""
        self.comm = comm

    def _lacks(self, what: str) -> CapabilityError:
        return CapabilityError(f"{type(self).__name__} {what}")

    @property
    def image_tower(self) -> ImageTower:
        """The image tower (what export, the linear probe and the bridges consume)."""
        raise self._lacks("has no image tower")

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise self._lacks("does not embed images")

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise self._lacks("does not embed texts")

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(I, T) scores between image and text embeddings: the dot product (query models: the best query)."""
        return image_emb @ text_emb.t()

    def itm_score(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        raise self._lacks("has no image-text matching head")

    def bridge_state(self) -> dict[str, torch.Tensor]:
        raise self._lacks("has no decoder bridge")

    def text_tokenizer(self):
        """A decoder model's prompt tokenizer (its language model's own tokenizer and chat template)."""
        raise self._lacks("has no language-model decoder")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every trained tower and transformer (train.grad_checkpointing)."""
        raise self._lacks("has no activation checkpointing")

    # capability "caption": an image-grounded decoder
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        raise self._lacks("has no captioning decoder")

    def lm_logits(self, input_ids: torch.Tensor, image_tokens: torch.Tensor, valid: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """(B, T, V) next-token logits; position 0 of ``input_ids`` is the start token."""
        raise self._lacks("has no captioning decoder")

    @property
    def special_token_ids(self) -> list[int]:
        """Ids a caption decoder must never emit (the model's own mode tokens)."""
        return []

    @property
    def context_length(self) -> int:
        raise self._lacks("has no captioning decoder")


def unit(x: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """``x`` L2-normalised along its last dimension (when ``enabled``)."""
    return F.normalize(x, dim=-1) if enabled else x


def clamped_scale(log_scale: torch.Tensor, max_scale: float) -> torch.Tensor:
    """The logit multiplier: exp of the learned log-scale, clamped at ``max_scale`` (CLIP)."""
    return log_scale.exp().clamp(max=max_scale)
