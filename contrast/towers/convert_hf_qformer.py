"""Convert a Hugging Face ``Blip2QFormerModel`` (state dict + query tokens + text embeddings) into our Q-Former's
state dict and config.

Hugging Face keeps BERT's module names (``encoder.layer.{i}.attention.attention.query`` ...) with separate query /
key / value projections; ours fuse them (``attn.qkv``, cross-attention ``xattn.q`` + ``xattn.kv``). The mapping
happens here, at load time, so the module keeps its own names. Nothing here builds a model: the caller builds the
Q-Former from :class:`ConvertedQFormer` and loads the weights with :func:`load_converted_qformer`::

    conv = convert_hf_qformer(hf.state_dict(), query_tokens, config=hf.config, embeddings=emb.state_dict())
    qformer = QFormer(conv.cfg, **conv.sizes)
    load_converted_qformer(qformer, conv.state_dict)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from contrast.config import QFormerConfig


def _get(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, dict) else getattr(config, name)


def qformer_config_from_hf(config: Any, num_queries: int) -> tuple[QFormerConfig, int, int, int]:
    """Our Q-Former config plus (vision_width, vocab_size, context_length) from a ``Blip2QFormerConfig`` (or dict)."""
    act = _get(config, "hidden_act")
    if act != "gelu":
        raise ValueError(f"the Hugging Face Q-Former uses activation '{act}'; only BERT's exact 'gelu' converts")
    width = int(_get(config, "hidden_size"))
    cfg = QFormerConfig(
        num_queries=num_queries,
        width=width,
        layers=int(_get(config, "num_hidden_layers")),
        heads=int(_get(config, "num_attention_heads")),
        mlp_ratio=int(_get(config, "intermediate_size")) / width,
        cross_attention_every=int(_get(config, "cross_attention_frequency")),
        layer_norm_eps=float(_get(config, "layer_norm_eps")),
    )
    return (cfg, int(_get(config, "encoder_hidden_size")), int(_get(config, "vocab_size")),
            int(_get(config, "max_position_embeddings")))


def _attn(sd: dict, src: str, dst: str, cross: bool) -> dict[str, torch.Tensor]:
    q, k, v = (f"{src}.attention.{n}" for n in ("query", "key", "value"))
    out = {f"{dst}.proj.weight": sd[f"{src}.output.dense.weight"], f"{dst}.proj.bias": sd[f"{src}.output.dense.bias"]}
    for t in ("weight", "bias"):
        if cross:
            out[f"{dst}.q.{t}"] = sd[f"{q}.{t}"]
            out[f"{dst}.kv.{t}"] = torch.cat([sd[f"{k}.{t}"], sd[f"{v}.{t}"]], dim=0)  # (2D, ...): keys then values
        else:
            out[f"{dst}.qkv.{t}"] = torch.cat([sd[f"{q}.{t}"], sd[f"{k}.{t}"], sd[f"{v}.{t}"]], dim=0)  # (3D, ...)
    return out


def _pair(sd: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": sd[f"{src}.weight"], f"{dst}.bias": sd[f"{src}.bias"]}


def convert_state_dict(sd: dict[str, torch.Tensor], query_tokens: torch.Tensor, layers: int,
                       embeddings: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Map Hugging Face Q-Former tensor names to ours. Missing text feed-forward weights are left out."""
    sd = {k.removeprefix("qformer."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {"query_tokens": query_tokens.reshape(1, *query_tokens.shape[-2:])}
    out.update(_pair(sd, "layernorm", "ln_embed"))
    for i in range(layers):
        src, dst = f"encoder.layer.{i}", f"layers.{i}"
        out.update(_attn(sd, f"{src}.attention", f"{dst}.attn", cross=False))
        out.update(_pair(sd, f"{src}.attention.output.LayerNorm", f"{dst}.ln_attn"))
        if f"{src}.crossattention.attention.query.weight" in sd:
            out.update(_attn(sd, f"{src}.crossattention", f"{dst}.xattn", cross=True))
            out.update(_pair(sd, f"{src}.crossattention.output.LayerNorm", f"{dst}.ln_xattn"))
        out.update(_pair(sd, f"{src}.intermediate_query.dense", f"{dst}.mlp_query.fc1"))
        out.update(_pair(sd, f"{src}.output_query.dense", f"{dst}.mlp_query.fc2"))
        out.update(_pair(sd, f"{src}.output_query.LayerNorm", f"{dst}.ln_mlp_query"))
        if f"{src}.intermediate.dense.weight" in sd:  # text feed-forward (use_qformer_text_input / retrieval models)
            out.update(_pair(sd, f"{src}.intermediate.dense", f"{dst}.mlp_text.fc1"))
            out.update(_pair(sd, f"{src}.output.dense", f"{dst}.mlp_text.fc2"))
            out.update(_pair(sd, f"{src}.output.LayerNorm", f"{dst}.ln_mlp_text"))
    if embeddings is not None:
        emb = {k.removeprefix("embeddings."): v for k, v in embeddings.items()}
        out["word_embeddings.weight"] = emb["word_embeddings.weight"]
        out["position_embeddings.weight"] = emb["position_embeddings.weight"]
    return out


@dataclass
class ConvertedQFormer:
    """A Hugging Face Q-Former in our terms: the state dict and what builds the module it fits."""

    state_dict: dict[str, torch.Tensor]
    cfg: QFormerConfig
    vision_width: int
    vocab_size: int  # Hugging Face's vocabulary; our word embedding has one more row, [DEC]
    context_length: int

    @property
    def sizes(self) -> dict[str, int]:
        """The Q-Former constructor's size arguments: ``QFormer(conv.cfg, **conv.sizes)``."""
        return {"vision_width": self.vision_width, "vocab_size": self.vocab_size, "context_length": self.context_length}


def convert_hf_qformer(
    state_dict: dict[str, torch.Tensor],
    query_tokens: torch.Tensor,
    *,
    config: Any,
    embeddings: dict[str, torch.Tensor] | None = None,
) -> ConvertedQFormer:
    """Our Q-Former's state dict and config from a Hugging Face ``Blip2QFormerModel`` state dict.

    ``query_tokens`` is the (1, Q, D) parameter that lives beside the Q-Former in ``Blip2Model`` /
    ``Blip2ForConditionalGeneration``; ``config`` its ``Blip2QFormerConfig`` (or a dict of the same fields);
    ``embeddings`` the ``Blip2TextEmbeddings`` state dict when text inputs are wanted (word and position
    embeddings). Our word embedding gains one row, the [DEC] token, after the Hugging Face vocabulary; it is
    drawn as our Q-Former initialises embeddings (normal, std ``cfg.init_std``). Without text feed-forward weights
    or ``embeddings`` those tensors are absent from the state dict: load it with :func:`load_converted_qformer`.
    """
    cfg, vision_width, vocab, context = qformer_config_from_hf(config, int(query_tokens.shape[-2]))
    if query_tokens.shape[-1] != cfg.width:
        raise ValueError(
            f"query tokens have width {query_tokens.shape[-1]} but the Q-Former's hidden size is {cfg.width}; "
            "pass the query_tokens of the same BLIP-2 model"
        )
    mapped = convert_state_dict(state_dict, query_tokens, cfg.layers, embeddings)
    if "word_embeddings.weight" in mapped:
        w = mapped["word_embeddings.weight"]  # (vocab, D)
        if w.shape[0] != vocab:
            raise ValueError(f"the text embeddings have {w.shape[0]} rows but config.vocab_size is {vocab}")
        dec = torch.empty(1, w.shape[1], dtype=w.dtype, device=w.device).normal_(std=cfg.init_std)  # (1, D)
        mapped["word_embeddings.weight"] = torch.cat([w, dec], dim=0)  # (vocab + 1, D)
    return ConvertedQFormer(mapped, cfg, vision_width=vision_width, vocab_size=vocab, context_length=context)


def load_converted_qformer(qformer: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a converted state dict into a built Q-Former; every tensor must fit one of its own (name and shape).

    Tensors the Hugging Face model did not have (text feed-forward, text embeddings) keep their initial values.
    """
    own = qformer.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs ours {tuple(own[k].shape)}" for k, v in state_dict.items()
           if k in own and v.shape != own[k].shape]
    unknown = [k for k in state_dict if k not in own]
    if bad or unknown:
        raise ValueError(f"Q-Former weights do not fit: {bad + unknown}")
    qformer.load_state_dict(state_dict, strict=False)
    return qformer


__all__ = ["ConvertedQFormer", "convert_hf_qformer", "convert_state_dict", "load_converted_qformer",
           "qformer_config_from_hf"]
