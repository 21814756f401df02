"""Vision-tower export (timm, Hugging Face, open_clip) with verification, and import of open_clip / OpenAI CLIPs.

Every export is loaded back with the target library right after it is written and its features are compared with
ours on random pixels; an export whose features differ by more than :data:`TOLERANCE` raises instead of leaving a
silently wrong directory behind.

- ``timm``: ``model.safetensors`` + ``config.json`` in timm's hub layout (``architecture``, ``model_args``,
  ``pretrained_cfg`` with mean / std / input size). Load with ``timm.create_model("local-dir:DIR")`` or
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=DIR/model.safetensors), **model_args)``.
  The backbone is saved without a classifier (``model(x)`` gives pooled features); our projection to the shared
  embedding is written beside as ``projection.safetensors`` (``embed = pooled @ weight.T``). transformers loads the
  same directory with ``AutoModel.from_pretrained(DIR)`` (a ``TimmWrapperModel``, its image processor with
  ``AutoImageProcessor``): the Hugging Face route for towers that are neither CLIP- nor SigLIP-shaped (CNNs).
- ``hf``: a ``CLIPVisionModelWithProjection`` directory (``config.json`` + ``model.safetensors`` +
  ``preprocessor_config.json``) that ``CLIPVisionModel.from_pretrained`` also loads (LLaVA's vision tower);
  a ViT without class token and with an attention-pool head goes to ``SiglipVisionModel`` instead.
- ``open_clip``: ``open_clip_config.json`` + ``open_clip_model.safetensors``, loadable with
  ``open_clip.create_model("local-dir:DIR")`` (the whole dual encoder: open_clip models are image + text). The image
  tower is open_clip's own ViT where it has CLIP's layout, else a ``TimmModel`` trunk; the text tower CLIP's
  transformer or, for a Hugging Face encoder, an ``HFTextEncoder`` whose config and tokenizer go to ``DIR/text_encoder``
  (``hf_model_name``) and the tokenizer also to ``DIR`` (``open_clip.get_tokenizer("local-dir:DIR")``). Tensors
  open_clip has no place for (the encoder's unused pooler) go to ``contrast_extra.safetensors`` for ``contrast import``.

Each format's preprocessing config (timm's ``pretrained_cfg``, open_clip's ``preprocess_cfg``, Hugging Face's
``preprocessor_config.json``) reproduces our eval pixels: short side to the input size, bicubic, centre crop; every
export also states the steps in ``contrast_preprocess.json`` (with ``resize: pad``, the white padding comes first).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from contrast.errors import UserError
from contrast.import_checkpoints import (  # import_checkpoint re-exported: `contrast import` lives there
    EXTRA_TENSORS,
    copy_tokenizer,
    import_checkpoint,
)
from contrast.models import DualEncoder
from contrast.runs import load_model, quiet_transformers
from contrast.tokenizer import build_tokenizer
from contrast.towers import ImageTower, TextTower
from contrast.towers.adapters import hf_folder
from contrast.towers.convert import (
    ConversionError,
    clip_layout,
    clip_layout_problems,
    hf_clip_problems,
    open_clip_model_cfg,
    siglip_problems,
    vit_to_hf_clip,
    vit_to_hf_siglip,
)
from contrast.towers.convert_open_clip import (
    clip_text_problems,
    dual_encoder_to_open_clip,
    fits_native_vit,
    hf_text_problems,
    timm_trunk_problems,
)
from contrast.towers.hf_text import HFTextTower

TOLERANCE = 1e-5
FORMATS = ("timm", "hf", "open_clip")


class ExportError(UserError, ValueError):
    """An export that the tower's architecture does not fit, or whose reloaded features differ from ours."""


@dataclass
class ExportReport:
    format: str
    out: Path
    checks: dict[str, float] = field(default_factory=dict)  # what was compared -> max |ours - theirs|

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.2e}" for k, v in self.checks.items())
        return f"exported {self.format} to {self.out} (max abs diff: {parts}; tolerance {TOLERANCE:g})"


def _check(report: ExportReport, name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    if ours.shape != theirs.shape:
        raise ExportError(f"{report.format} export check '{name}': shape {tuple(theirs.shape)} != ours {tuple(ours.shape)}")
    diff = float((ours.float() - theirs.float()).abs().max())
    report.checks[name] = diff
    if not diff <= TOLERANCE:
        raise ExportError(
            f"{report.format} export check '{name}' failed: max abs diff {diff:.3g} > {TOLERANCE:g}; "
            f"the files in {report.out} do not reproduce the tower"
        )


def _probe_pixels(tower: ImageTower, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    s = tower.cfg.image_size
    return torch.randn(n, 3, s, s, generator=g)


def fitting_formats(tower: ImageTower, has_text: bool = True) -> list[str]:
    """The formats the image tower fits; open_clip only where ``has_text`` (the model's text tower fits it too)."""
    fits = ["timm"]
    if not hf_clip_problems(tower.backbone, tower.cfg.pool) or not siglip_problems(tower.backbone, tower.cfg.pool):
        fits.append("hf")
    if has_text and (not clip_layout_problems(tower.backbone) or not _open_clip_image_problems(tower, _probe_pixels(tower))):
        fits.append("open_clip")
    return fits


# --------------------------------------------------------------------------------------------------- timm


def _timm_pretrained_cfg(tower: ImageTower, num_classes: int) -> dict:
    s = tower.cfg.image_size
    base = dict(getattr(tower.backbone, "pretrained_cfg", {}) or {})
    return {
        "input_size": [3, s, s],
        "fixed_input_size": bool(base.get("fixed_input_size", tower.is_sequence)),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(tower.cfg.mean),
        "std": list(tower.cfg.std),
        "num_classes": num_classes,
        "first_conv": base.get("first_conv", ""),
        "classifier": base.get("classifier", "head"),
    }


def export_timm(tower: ImageTower, out: str | Path) -> ExportReport:
    import timm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport("timm", out)
    tower = tower.eval()
    x = _probe_pixels(tower)
    backbone = tower.backbone
    with torch.no_grad():
        tokens = tower.forward_tokens(x)
    # timm's classifier is left off (num_classes=0): a checkpoint with a head would be dropped by timm whenever the
    # caller's num_classes differs from the architecture's default; the projection is written beside instead
    E = 0
    save_file({"weight": tower.proj.weight.detach().contiguous()}, str(out / "projection.safetensors"))
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(out / "model.safetensors"))
    # img_size included: timm builds the same input size. num_classes is stated once, at the top level (timm reads it
    # there; transformers' TimmWrapperModel passes its own num_classes=0 beside model_args and refuses a second one)
    model_args = {k: v for k, v in tower.timm_kwargs.items() if k != "num_classes"}
    config = {
        "architecture": tower.cfg.name,
        "num_classes": E,
        "num_features": tower.width,
        "model_args": model_args,
        "pretrained_cfg": _timm_pretrained_cfg(tower, E),
        "contrast": {"pool": tower.cfg.pool, "embed_dim": tower.embed_dim, "projection": "projection.safetensors",
                     "resize": tower.cfg.resize},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_preprocess_note(tower, out)

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        feats = loaded.forward_features(x)
        if feats.ndim == 4:
            feats = feats.flatten(2).transpose(1, 2)  # (B, H*W, C)
        _check(report, "tokens", tokens, feats)
        if tower.is_sequence and tower.cfg.pool == "default":  # timm's own pooling is ours
            _check(report, "pooled", tower.pool(tokens), loaded(x))
        w = load_file(str(out / "projection.safetensors"))["weight"]
        _check(report, "image_embeds", tower.embed(x), tower.pool(feats) @ w.t())
    _check_timm_wrapper(report, tower, x, w)
    return report


def _check_timm_wrapper(report: ExportReport, tower: ImageTower, x: torch.Tensor, w: torch.Tensor) -> None:
    """The timm export is also the Hugging Face route for every tower (CNNs included): transformers loads it with
    ``AutoModel.from_pretrained(DIR)`` as a ``TimmWrapperModel``. Checked where transformers is installed."""
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers import AutoModel

    wrapped = AutoModel.from_pretrained(str(report.out)).eval()
    with torch.no_grad():
        o = wrapped(pixel_values=x)
        hidden = o.last_hidden_state
        if hidden.ndim == 4:
            hidden = hidden.flatten(2).transpose(1, 2)  # (B, H*W, C)
        _check(report, "transformers_last_hidden_state", tower.forward_tokens(x), hidden)
        _check(report, "transformers_image_embeds", tower.embed(x), tower.pool(hidden) @ w.t())


# --------------------------------------------------------------------------------------------------- Hugging Face


def _hf_preprocessor(tower: ImageTower) -> dict:
    """CLIPImageProcessor settings that reproduce our eval pixels: short side to S (bicubic), centre S x S crop.

    Written for SigLIP-style towers too: ``SiglipImageProcessor`` only resizes straight to a square, which frames
    every non-square image differently from ours. Hugging Face floors the crop offset where we (like timm and
    torchvision) round it half to even: a one-pixel shift when the resized long side exceeds S by 4k + 3."""
    s = tower.cfg.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": s},
        "do_center_crop": True,
        "crop_size": {"height": s, "width": s},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(tower.cfg.mean),
        "image_std": list(tower.cfg.std),
        "do_convert_rgb": True,
    }


PREPROCESS_NOTE = "contrast_preprocess.json"


def _write_preprocess_note(tower: ImageTower, out: Path) -> None:
    """Our eval preprocessing, stated once beside every export: with ``resize: pad`` the image is first centred on a
    white square, a step no target library's config expresses (pad first, then use the exported preprocessing)."""
    note = {
        "image_size": tower.cfg.image_size,
        "resize": tower.cfg.resize,
        "steps": (["pad to a square on white (255, 255, 255), image centred, offsets floored"]
                  if tower.cfg.resize == "pad" else [])
        + ["resize the short side to image_size (PIL bicubic, antialiased; the long side floored)",
           "crop the centre image_size x image_size (offset rounded half to even, as torchvision's CenterCrop)",
           "scale to [0, 1], subtract mean, divide by std"],
        "mean": list(tower.cfg.mean),
        "std": list(tower.cfg.std),
    }
    (out / PREPROCESS_NOTE).write_text(json.dumps(note, indent=2))


def export_hf(tower: ImageTower, out: str | Path) -> ExportReport:
    clip_p = hf_clip_problems(tower.backbone, tower.cfg.pool)
    if not clip_p:
        return _export_hf_clip(tower, Path(out))
    sig_p = siglip_problems(tower.backbone, tower.cfg.pool)
    if not sig_p:
        return _export_hf_siglip(tower, Path(out))
    raise ExportError(
        f"the image tower '{tower.cfg.name}' has no Hugging Face equivalent: not CLIPVisionModel ({'; '.join(clip_p)}); "
        f"not SiglipVisionModel ({'; '.join(sig_p)}). Its Hugging Face route is the timm export: "
        "contrast export --format timm, then transformers.AutoModel.from_pretrained(DIR) loads it (TimmWrapperModel). "
        "Formats that fit this tower: " + ", ".join(f for f in fitting_formats(tower) if f != "hf")
    )


def _export_hf_clip(tower: ImageTower, out: Path) -> ExportReport:
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport("hf", out)
    cfg_kwargs, sd = vit_to_hf_clip(tower.backbone, tower.proj.weight, tower.cfg.pool)
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg_kwargs))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(f"HF CLIP key map incomplete: missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(_hf_preprocessor(tower), indent=2))
    _write_preprocess_note(tower, out)

    x = _probe_pixels(tower)
    tower = tower.eval()
    with torch.no_grad():
        hidden = tower.forward_intermediates(x, [-1])[0]  # last block, before ln_post
        pooled = tower.pool(tower.forward_tokens(x))
        emb = tower.embed(x)
        plain = CLIPVisionModel.from_pretrained(str(out)).eval()
        o = plain(pixel_values=x)
        _check(report, "last_hidden_state", hidden, o.last_hidden_state)
        _check(report, "pooler_output", pooled, o.pooler_output)
        proj = CLIPVisionModelWithProjection.from_pretrained(str(out)).eval()
        _check(report, "image_embeds", emb, proj(pixel_values=x).image_embeds)
    return report


def _export_hf_siglip(tower: ImageTower, out: Path) -> ExportReport:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport("hf", out)
    cfg_kwargs, sd = vit_to_hf_siglip(tower.backbone, tower.cfg.pool)
    hf = SiglipVisionModel(SiglipVisionConfig(**cfg_kwargs))
    target = getattr(hf, "vision_model", hf)
    missing, unexpected = target.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(f"HF SigLIP key map incomplete: missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(str(out))
    # SiglipVisionModel has no projection: ours is written beside it, applied as pooler_output @ weight.T
    save_file({"weight": tower.proj.weight.detach().contiguous()}, str(out / "projection.safetensors"))
    (out / "preprocessor_config.json").write_text(json.dumps(_hf_preprocessor(tower), indent=2))
    _write_preprocess_note(tower, out)

    x = _probe_pixels(tower)
    tower = tower.eval()
    with torch.no_grad():
        tokens = tower.forward_tokens(x)
        o = SiglipVisionModel.from_pretrained(str(out)).eval()(pixel_values=x)
        _check(report, "last_hidden_state", tokens, o.last_hidden_state)
        _check(report, "pooler_output", tower.pool(tokens), o.pooler_output)
        w = load_file(str(out / "projection.safetensors"))["weight"]
        _check(report, "image_embeds", tower.embed(x), o.pooler_output @ w.t())
    return report


# --------------------------------------------------------------------------------------------------- open_clip


HF_TEXT_FOLDER = "text_encoder"  # an open_clip export's Hugging Face text encoder: its config and tokenizer
PROBE_TEXTS = ["a photo of a dog", "an emoji of a grinning face with big eyes, drawn in a flat style", "x"]


def _open_clip_refusal(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``model`` cannot be written as open_clip (None: it can), naming the parts, then the formats that fit."""
    tower = model.image_tower
    if not (isinstance(model, DualEncoder) and isinstance(model.text, TextTower | HFTextTower)):
        return ("open_clip checkpoints hold an image and a text tower; this model has no CLIP or Hugging Face text "
                "tower. Formats that fit: " + ", ".join(fitting_formats(tower, has_text=False)))
    text = model.text
    if isinstance(text, TextTower) and not clip_layout_problems(tower.backbone):
        return None  # native CLIP: open_clip's own ViT and text transformer (the text is checked after writing)
    text_p = hf_text_problems(text) if isinstance(text, HFTextTower) else clip_text_problems(text)
    image_p = _open_clip_image_problems(tower, x)
    parts = [f"the image tower does not fit open_clip: {'; '.join(image_p)}"] if image_p else []
    if text_p and isinstance(text, HFTextTower):
        parts.append("the Hugging Face text tower does not fit open_clip's HFTextEncoder: " + "; ".join(text_p))
    elif text_p:
        parts.append("the text tower has options the open_clip export beside a timm trunk does not write: "
                     + ", ".join(text_p))
    if not parts:
        return None
    return "; ".join(parts) + ". Formats that fit: " + ", ".join(fitting_formats(tower, has_text=not text_p))


def _open_clip_image_problems(tower: ImageTower, x: torch.Tensor) -> list[str]:
    """Why the image tower is neither open_clip's own ViT nor a trunk of its TimmModel (empty: it is one)."""
    if fits_native_vit(tower.backbone):
        return []
    trunk = timm_trunk_problems(tower.eval(), x)
    if not trunk:
        return []
    vit = clip_layout_problems(tower.backbone) or [f"activation {clip_layout(tower.backbone).act}"]
    return [f"not open_clip's ViT ({'; '.join(vit)}) nor a timm trunk of its TimmModel ({'; '.join(trunk)})"]


def _open_clip_parts(model: DualEncoder, out: Path, x: torch.Tensor) -> tuple[dict, dict, dict]:
    """(open_clip ``model_cfg``, state dict, our tensors open_clip has no place for) of a dual encoder."""
    try:
        if isinstance(model.text, TextTower) and not clip_layout_problems(model.image.backbone):
            return (*open_clip_model_cfg(model), {})
        logits = {"logit_scale": model.logit_scale}
        if model.logit_bias is not None:
            logits["logit_bias"] = model.logit_bias
        folder = str((out / HF_TEXT_FOLDER).resolve())
        return dual_encoder_to_open_clip(model.image, model.text, logits, folder, x)
    except ConversionError as e:
        raise ExportError(str(e)) from e


def _write_hf_text_encoder(text: HFTextTower, out: Path) -> None:
    """The Hugging Face text encoder's config and tokenizer in OUT/text_encoder (``hf_model_name``: open_clip builds
    the encoder from that config), and the tokenizer also in OUT (``open_clip.get_tokenizer('local-dir:OUT')`` reads
    it there, and ``contrast import`` finds it there)."""
    config = copy.deepcopy(text.encoder.config)
    config.pad_token_id = text.pad_token_id  # open_clip masks ids != pad_token_id, as we do (0 where unset)
    config.save_pretrained(str(out / HF_TEXT_FOLDER))
    src = Path(hf_folder(text.cfg.hf_path))
    for dst in (out / HF_TEXT_FOLDER, out):
        copy_tokenizer(src, dst, int(config.vocab_size), subdir="")


def _write_open_clip(model: DualEncoder, out: Path, x: torch.Tensor) -> None:
    tower = model.image
    model_cfg, sd, extra = _open_clip_parts(model, out, x)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": tower.cfg.image_size,
            "mean": list(tower.cfg.mean),
            "std": list(tower.cfg.std),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    _write_preprocess_note(tower, out)
    save_file(sd, str(out / "open_clip_model.safetensors"))
    (out / EXTRA_TENSORS).unlink(missing_ok=True)
    if extra:  # e.g. the HF encoder's unused pooler: `contrast import` puts them back, so the round trip is exact
        save_file(extra, str(out / EXTRA_TENSORS))
    if isinstance(model.text, HFTextTower):
        _write_hf_text_encoder(model.text, out)


def _probe_ids(model: DualEncoder, out: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids for open_clip's text encoder, the same texts by the run's own tokenizer or None). A Hugging Face text
    tower gets real texts through the exported tokenizer (padded to the context with the pad id, from which
    open_clip's HFTextEncoder builds its attention mask); CLIP's, random ids with end-of-text mid-way and padding."""
    import open_clip

    if isinstance(model.text, HFTextTower):
        theirs = open_clip.get_tokenizer(f"local-dir:{out}")(PROBE_TEXTS)
        return theirs, build_tokenizer(model.text.cfg)(PROBE_TEXTS)
    g = torch.Generator().manual_seed(1)
    T = model.text.cfg.context_length
    ids = torch.randint(1, model.text.cfg.vocab_size - 1, (2, T), generator=g)
    ids[:, T // 2] = model.text.cfg.vocab_size - 1  # end-of-text (highest id) in the middle, padding after
    ids[:, T // 2 + 1 :] = 0
    return ids, None


def _verify_open_clip(model: DualEncoder, report: ExportReport, x: torch.Tensor) -> None:
    """Load the folder with open_clip and compare its encoders, logit scale and bias with ours."""
    import open_clip

    try:
        oc = open_clip.create_model(f"local-dir:{report.out}").eval()
    except RuntimeError as e:  # a strict load that does not fit: name the tensors, in one line
        raise ExportError(f"open_clip cannot load the export in {report.out}: {' '.join(str(e).split())[:600]}") from e
    ids, own_ids = _probe_ids(model, report.out)
    with torch.no_grad():
        _check(report, "encode_image", model.image.embed(x), oc.encode_image(x))
        _check(report, "encode_text", model.text.embed(ids), oc.encode_text(ids))
        if own_ids is not None:  # the exported tokenizer is the run's: its ids (padded shorter) embed the same
            _check(report, "encode_text_run_tokenizer", model.text.embed(own_ids), oc.encode_text(ids))
        _check(report, "logit_scale", model.logit_scale, oc.logit_scale)
        if model.logit_bias is not None:
            _check(report, "logit_bias", model.logit_bias, oc.logit_bias)


def export_open_clip(model: nn.Module, out: str | Path) -> ExportReport:
    """The whole dual encoder as an open_clip ``local-dir`` folder, verified by loading it with open_clip."""
    model = model.eval()
    x = _probe_pixels(model.image_tower)
    refusal = _open_clip_refusal(model, x)
    if refusal:
        raise ExportError(refusal)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport("open_clip", out)
    _write_open_clip(model, out, x)
    _verify_open_clip(model, report, x)
    return report


# --------------------------------------------------------------------------------------------------- entry points


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> ExportReport:
    """Export the image tower of a run directory / checkpoint in ``fmt`` (timm | hf | open_clip) and verify it."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    with quiet_transformers():  # a Hugging Face text tower loads from its folder
        model = load_model(checkpoint)
    if fmt == "open_clip":
        return export_open_clip(model, out)
    tower = model.image_tower
    report = export_timm(tower, out) if fmt == "timm" else export_hf(tower, out)
    if model.supports("bridge"):  # a decoder run: its projector / taps + gated cross-attention go beside
        save_file({k: v.detach().contiguous() for k, v in model.bridge_state().items()}, str(Path(out) / "bridge.safetensors"))
        b = model.cfg.bridge
        meta = {"mode": b.mode, "layer": b.layer, "tokens": b.tokens, "taps": list(b.taps), "xattn_every": b.xattn_every,
                "xattn_layers": list(b.xattn_layers), "xattn_mlp_ratio": b.xattn_mlp_ratio, "embedding_token": b.embedding_token,
                "tower_width": tower.width, "decoder_width": model.width, "decoder_heads": b.decoder.heads}
        (Path(out) / "bridge.json").write_text(json.dumps(meta, indent=2))
    return report


__all__ = [
    "ExportReport",
    "ExportError",
    "export_timm",
    "export_hf",
    "export_open_clip",
    "export_checkpoint",
    "import_checkpoint",
    ]
