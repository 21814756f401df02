"""``contrast import``: foreign image-text checkpoints -> a contrast run directory every command takes.

What it reads (:data:`READS`):

- a Hugging Face ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` folder (``config.json`` + ``model.safetensors``
  and the folder's tokenizer; SigLIP 2 at its native square grid);
- an open_clip model: a ``local-dir`` folder (``open_clip_config.json`` + weights) or a weights file with
  ``--open-clip-config``, for every tower kind of open_clip's configs: native ViTs, timm trunks (ConvNeXt, EVA, SigLIP's
  ViT), the ModifiedResNet (RN50), native text transformers (CLIP's, SigLIP's) and Hugging Face text encoders;
- an OpenAI CLIP checkpoint (ViT; TorchScript archives too).

The run holds ``config.yaml``, the weights at step 0 and, where the text tower needs one, the tokenizer
(``RUN/tokenizer``) and the Hugging Face text encoder's folder (``RUN/text_encoder``); config paths point into the run.
An open_clip folder written by ``contrast export`` may hold :data:`EXTRA_TENSORS`, the run's tensors open_clip has no
place for (a Hugging Face encoder's unused pooler); they are put back, so export then import gives the same weights.
Conversion lives in :mod:`contrast.towers.convert` and its ``convert_*`` siblings; this module reads files, builds the
model, loads it strictly and writes the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from contrast.config import ClipModelConfig, Config, save_config
from contrast.models import build_model
from contrast.runs import WEIGHTS, quiet_transformers, save_model_weights, step_dir
from contrast.towers.adapters import read_state_dict
from contrast.towers.convert import ConversionError, import_clip, load_foreign_state_dict
from contrast.towers.convert_hf_clip import HF_KINDS, hf_kind, import_hf_dual_encoder

if TYPE_CHECKING:
    from contrast.towers.convert_open_clip import OpenClipImport

READS = (
    "Hugging Face CLIPModel / SiglipModel / Siglip2Model folders (config.json + weights + tokenizer)",
    "open_clip models: a local-dir folder (open_clip_config.json + weights) or weights + --open-clip-config "
    "(ViT, timm trunks such as ConvNeXt / EVA / SigLIP, ModifiedResNet RN50, CLIP / SigLIP / Hugging Face text towers)",
    "OpenAI CLIP checkpoints (ViT; TorchScript .pt archives too)",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
EXTRA_TENSORS = "contrast_extra.safetensors"  # beside an open_clip export: our tensors under our names


# --------------------------------------------------------------------------------------------------- writing


def write_run(mcfg: ClipModelConfig, state: dict[str, torch.Tensor], out: Path) -> Path:
    """Build the model of ``mcfg``, load ``state`` strictly and save it as step 0 of a new run directory."""
    with quiet_transformers():  # a Hugging Face text tower loads from its folder
        model = build_model(mcfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ConversionError(f"converted checkpoint does not fit the dual encoder: missing {missing}, "
                              f"unexpected {unexpected}")
    model.eval()
    if mcfg.image.pool == "head" and model.image.is_sequence:  # a token model's own head is its default pooling
        mcfg.image.pool = "default"
    out.mkdir(parents=True, exist_ok=True)
    save_config(Config(model=mcfg), out / "config.yaml")
    step = step_dir(out, 0)
    step.mkdir(parents=True, exist_ok=True)
    save_model_weights(model, step / WEIGHTS)
    (out / "checkpoints" / "latest").write_text(step.name + "\n")
    return out


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def copy_tokenizer(src: Path, out: Path, vocab_size: int, subdir: str = "tokenizer") -> Path:
    """The Hugging Face tokenizer of ``src`` saved into ``out/subdir``; refuses one whose ids exceed the vocab."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise ConversionError(f"cannot load the tokenizer in {src}: {e}") from e
    if len(tok) > vocab_size:
        raise ConversionError(f"the tokenizer in {src} has {len(tok)} tokens but the text tower's vocabulary "
                              f"{vocab_size}; it belongs to another model")
    dst = out / subdir if subdir else out
    tok.save_pretrained(str(dst))
    return dst.resolve()


# --------------------------------------------------------------------------------------------------- Hugging Face


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in HF_WEIGHTS:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise ConversionError(f"{folder} holds no {' or '.join(HF_WEIGHTS)} (sharded checkpoints: merge the shards first)")


def _hf_mean_std(folder: Path, mcfg: ClipModelConfig) -> None:
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        raw = json.loads(pre.read_text())
        if "image_mean" in raw and "image_std" in raw:
            mcfg.image.mean, mcfg.image.std = tuple(raw["image_mean"]), tuple(raw["image_std"])


def import_hf_folder(folder: Path, out: Path, tokenizer: str | Path | None = None) -> Path:
    """A Hugging Face CLIP / SigLIP / SigLIP 2 folder -> a run directory (tokenizer from the folder or ``tokenizer``)."""
    from transformers import AutoConfig

    raw = json.loads((folder / "config.json").read_text())
    hf_kind(raw)  # refuses other model types before transformers is asked
    hf_cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True).to_dict()
    state, mcfg = import_hf_dual_encoder(hf_cfg, _hf_weights(folder))
    _hf_mean_std(folder, mcfg)
    tok_src = Path(tokenizer) if tokenizer else folder
    if not has_tokenizer(tok_src):
        raise ConversionError(f"no tokenizer in {tok_src} ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                              "pass --tokenizer DIR with the model's tokenizer files")
    mcfg.text.tokenizer = str(copy_tokenizer(tok_src, out, mcfg.text.vocab_size))
    return write_run(mcfg, state, out)


# --------------------------------------------------------------------------------------------------- open_clip


def _read_open_clip_config(path: str | Path) -> tuple[dict, dict]:
    raw = json.loads(Path(path).read_text())
    return raw.get("model_cfg", raw), raw.get("preprocess_cfg", {})


def _open_clip_weights(folder: Path) -> Path:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder} has an open_clip_config.json but no open_clip_model.safetensors / "
                          "open_clip_pytorch_model.bin")


def import_open_clip(sd: dict[str, torch.Tensor], out: Path, oc_cfg: dict | None, pre: dict,
                     quick_gelu: bool | None, tokenizer: str | Path | None,
                     extra: dict[str, torch.Tensor] | None = None) -> Path:
    """An open_clip / OpenAI state dict (with open_clip's model config when known) -> a run directory; ``extra``:
    tensors of ours the open_clip model has no place for (:data:`EXTRA_TENSORS`), under our names."""
    from contrast.towers.convert_open_clip import import_open_clip_model, is_native_vit_clip

    mean, std = pre.get("mean"), pre.get("std")
    if quick_gelu is None:
        quick_gelu = bool(oc_cfg.get("quick_gelu", False)) if oc_cfg is not None else True
    if oc_cfg is None or is_native_vit_clip(oc_cfg):
        state, mcfg = import_clip(sd, quick_gelu=quick_gelu, open_clip_cfg=oc_cfg, mean=mean, std=std)
        return write_run(mcfg, state, out)
    conv = import_open_clip_model(sd, oc_cfg, quick_gelu=quick_gelu, mean=mean, std=std)
    _put_back(conv, extra or {})
    if conv.tokenizer_name is not None:  # an HF tokenizer (SigLIP's): from --tokenizer, never downloaded
        if tokenizer is None or not has_tokenizer(Path(tokenizer)):
            raise ConversionError(f"this open_clip model tokenizes with the Hugging Face tokenizer "
                                  f"'{conv.tokenizer_name}', which is not downloaded here; pass --tokenizer DIR "
                                  "holding its files")
        conv.config.text.tokenizer = str(copy_tokenizer(Path(tokenizer), out, conv.config.text.vocab_size))
    if conv.text_encoder is not None:  # a Hugging Face text encoder: its folder travels with the run
        tok_src = tokenizer or oc_cfg.get("text_cfg", {}).get("hf_tokenizer_name") or conv.text_encoder_name
        path, encoder_state = save_text_encoder(str(conv.text_encoder_name), conv.text_encoder, out / "text_encoder",
                                                Path(tok_src))
        conv.config.text.hf_path = str(path)
        conv.state.update(encoder_state)
    return write_run(conv.config, conv.state, out)


def _put_back(conv: OpenClipImport, extra: dict[str, torch.Tensor]) -> None:
    """Our tensors that open_clip's model lacks back into the import: the HF encoder's into its state dict (they are
    saved with its folder), the rest into the run's."""
    for k, v in extra.items():
        if k.startswith("text.encoder.") and conv.text_encoder is not None:
            conv.text_encoder[k.removeprefix("text.encoder.")] = v
        else:
            conv.state[k] = v


def save_text_encoder(name: str, state: dict[str, torch.Tensor], folder: Path,
                      tokenizer: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """open_clip's Hugging Face text encoder saved as a model folder with its tokenizer; returns the folder and the
    encoder's tensors under our names (``text.encoder.*``, an unused pooler included)."""
    from transformers import AutoConfig, AutoModel

    src = Path(name)
    if not (src / "config.json").is_file():
        raise ConversionError(f"text_cfg.hf_model_name '{name}' is not a local Hugging Face folder (config.json) and "
                              "nothing is downloaded here; point hf_model_name at the model's local folder")
    if not has_tokenizer(tokenizer):
        raise ConversionError(f"no tokenizer for the Hugging Face text tower in {tokenizer}; pass --tokenizer DIR")
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(src), local_files_only=True))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]  # open_clip's mean pooling builds no pooler
    if missing or unexpected:
        raise ConversionError(f"the open_clip text encoder does not fit {type(model).__name__} built from {src}: "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    with quiet_transformers():
        model.save_pretrained(str(folder))
    copy_tokenizer(tokenizer, folder, 10**9, subdir="")
    return folder.resolve(), {f"text.encoder.{k}": v for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------- entry point


def import_checkpoint(
    weights: str | Path,
    out: str | Path,
    *,
    open_clip_config: str | Path | None = None,
    quick_gelu: bool | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Convert a foreign checkpoint (see :data:`READS`) into a run directory that ``contrast.load`` and training use.

    ``weights``: a Hugging Face or open_clip folder, or a weights file; ``open_clip_config``: open_clip's model config
    JSON for a weights file (without it the OpenAI conventions apply: 64-wide heads, QuickGELU unless ``quick_gelu``
    says otherwise); ``tokenizer``: a local tokenizer folder where the checkpoint names one it does not ship.
    """
    src, out = Path(weights), Path(out)
    if src.is_dir():
        if (src / "config.json").is_file() and json.loads((src / "config.json").read_text()).get("model_type") in HF_KINDS:
            return import_hf_folder(src, out, tokenizer)
        if (src / "open_clip_config.json").is_file():
            oc_cfg, pre = _read_open_clip_config(src / "open_clip_config.json")
            sd = load_foreign_state_dict(str(_open_clip_weights(src)))
            extra = read_state_dict(src / EXTRA_TENSORS) if (src / EXTRA_TENSORS).is_file() else None
            return import_open_clip(sd, out, oc_cfg, pre, quick_gelu, tokenizer or (src if has_tokenizer(src) else None),
                                    extra)
        if (src / "config.json").is_file():
            hf_kind(json.loads((src / "config.json").read_text()))  # names the model type it does not read
        raise ConversionError(f"{src} is neither a Hugging Face CLIP / SigLIP folder (config.json) nor an open_clip "
                              "folder (open_clip_config.json)")
    oc_cfg, pre = _read_open_clip_config(open_clip_config) if open_clip_config is not None else (None, {})
    return import_open_clip(load_foreign_state_dict(str(src)), out, oc_cfg, pre, quick_gelu, tokenizer)
