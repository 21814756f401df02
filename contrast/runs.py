"""Run directories: their layout, loading a trained model, and building a model whose config names other runs.

Layout of a run directory::

    RUN_DIR/config.yaml                                    the resolved recipe
    RUN_DIR/checkpoints/step_00000100/model.safetensors    weights (any step directory is loadable)
    RUN_DIR/checkpoints/step_00000100/state.pt             training state (see contrast.train.checkpoint)
    RUN_DIR/checkpoints/step_00000100/sharded/             FSDP runs: model and optimizer shards (DCP), in place of
                                                           the weights until `contrast train consolidate` writes them
    RUN_DIR/checkpoints/latest                             the name of the newest complete step directory
    RUN_DIR/checkpoints/best                               with train.best_metric: the best evaluated step's name
    RUN_DIR/metrics.jsonl  RUN_DIR/tensorboard/            logged steps, evaluations and the run summary

``model, preprocess, tokenizer = contrast.load(RUN_DIR)``. :func:`build` is the one place where a recipe's
references to other runs become parts: a run's image tower (``model.blip2.tower``, ``model.bridge.tower``), a
stage-1 Q-Former (``model.blip2.stage1``), decoder weights (``model.blip2.decoder.weights``), the tower of a
features directory (``model.blip2.features``) and a Hugging Face decoder (``source: hf``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from contrast.config import Config, DecoderConfig, ImageTowerConfig, ModelConfig, load_config
from contrast.data.lm_fetch import lm_folder
from contrast.data.transforms import model_transform
from contrast.decoders import HFCodec, HFLanguageModel
from contrast.errors import CheckpointError
from contrast.models import Blip2Stage1, CaptionLM, Model, Parts, build_model, own_lm
from contrast.tokenizer import build_tokenizer
from contrast.towers import ImageTower

WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"  # the folder of step directories inside a run directory
POINTERS = ("latest", "best")  # files in it naming the newest complete step and the best evaluated one
SHARDED = "sharded"  # the torch.distributed.checkpoint folder of an FSDP checkpoint (model and optimizer)
FEATURES_TOWER = "tower.safetensors"  # the frozen tower's weights inside a `contrast features extract` directory


# --------------------------------------------------------------------------------------------------- layout


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` under a temporary name, sync it and move it into place: a process killed at any moment leaves
    the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def _holds_checkpoint(p: Path) -> bool:
    return (p / WEIGHTS).is_file() or (p / SHARDED).is_dir()


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, a ``checkpoints`` folder or a step directory -> the step directory, whether it holds weights
    or only FSDP shards (what resuming reads; loading a model goes through :func:`resolve`)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path not found: {p}")
    if _holds_checkpoint(p):
        return p
    if p.is_file() and p.name in POINTERS:  # RUN/checkpoints/best or .../latest
        return _follow(p)
    for root in (p / CHECKPOINTS, p):
        if (root / "latest").is_file():
            return _follow(root / "latest")
    raise CheckpointError(f"{p} holds no checkpoint (no {WEIGHTS}, no checkpoints/latest); train first or pass a step directory")


def _follow(pointer: Path) -> Path:
    """The step directory a ``latest`` / ``best`` file names (a bare step_N name, never a path elsewhere)."""
    name = pointer.read_text(errors="replace").strip()
    if not name.startswith("step_") or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{pointer} should name a step directory beside it (step_N), not '{name[:80]}'; the "
                              "run may be damaged: pass a step directory instead")
    target = pointer.parent / name
    if not _holds_checkpoint(target):
        raise CheckpointError(f"{pointer} names {target}, which has no {WEIGHTS}; the run may be damaged")
    return target


def resolve(path: str | Path) -> Path:
    """A run directory, a ``checkpoints`` folder or a step directory -> the step directory to load weights from."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / WEIGHTS).is_file():
        raise CheckpointError(f"{ckpt} is a sharded (FSDP) checkpoint without consolidated weights; write its "
                              f"{WEIGHTS} with: contrast train consolidate {ckpt}")
    return ckpt


def run_dir_of(ckpt: Path) -> Path:
    """The run directory that holds a step directory (where config.yaml lives)."""
    for cand in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (cand / "config.yaml").is_file():
            return cand
    raise CheckpointError(f"no config.yaml found beside {ckpt}; it is needed to rebuild the model")


def load_config_of(path: str | Path) -> tuple[Config, Path]:
    """The config and the step directory of a run directory or checkpoint."""
    ckpt = resolve(path)
    return load_config(run_dir_of(ckpt) / "config.yaml"), ckpt


# --------------------------------------------------------------------------------------------------- weights


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a torch.compile and / or DDP wrapper."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(inner, "module", inner)  # DistributedDataParallel


def saved_keys_skip(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes a checkpoint leaves out: frozen parts rebuilt from the config's files when the run is
    loaded (a pretrained language model, a tower of another run); see ``Model.rebuilt_prefixes``."""
    return tuple(getattr(unwrap(model), "rebuilt_prefixes", ()))


def save_model_weights(model: nn.Module, path: str | Path) -> None:
    model = unwrap(model)
    skip = saved_keys_skip(model)
    if not skip:
        save_model(model, str(path))
        return
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in model.state_dict().items():  # tensors shared between modules (tied embeddings) are stored once
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        if k.startswith(skip) or ptr in seen:
            continue
        seen.add(ptr)
        kept[k] = v.detach().contiguous()
    save_file(kept, str(path))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model``; a file from a different model raises naming the tensors that differ."""
    tensors = read_weights(path)
    model = unwrap(model)
    skip = saved_keys_skip(model)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)} if skip else model.state_dict()
    tensors = {k: v for k, v in tensors.items() if not k.startswith(skip)} if skip else tensors
    aliases = _shared_aliases(model)  # tensors shared between modules are stored once
    problems = _mismatch(own, tensors, aliases)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} was made for a different model config.\n  " + "\n  ".join(problems)
            + "\n  Load it with the config it was trained with (the run directory's config.yaml), or start fresh."
        )
    for k, v in own.items():
        src = tensors.get(k)
        if src is None:
            src = next(tensors[a] for a in aliases[k] if a in tensors)
        with torch.no_grad():
            v.copy_(src)


def _mismatch(own: dict, tensors: dict, aliases: dict[str, list[str]]) -> list[str]:
    shape_diff = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in tensors.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in tensors and not any(a in tensors for a in aliases.get(k, ()))]
    unexpected = [k for k in tensors if k not in own]
    lines = []
    if shape_diff:
        lines.append(f"{len(shape_diff)} tensors differ in shape: " + "; ".join(shape_diff[:8]))
    if missing:
        lines.append(f"{len(missing)} model tensors are missing from the checkpoint: " + ", ".join(missing[:8]))
    if unexpected:
        lines.append(f"{len(unexpected)} checkpoint tensors are not in the model: " + ", ".join(unexpected[:8]))
    return lines


def _shared_aliases(model: nn.Module) -> dict[str, list[str]]:
    by_ptr: dict[tuple[int, int], list[str]] = {}
    for k, v in model.state_dict(keep_vars=False).items():
        by_ptr.setdefault((v.untyped_storage().data_ptr(), v.storage_offset()), []).append(k)
    return {n: [m for m in names if m != n] for names in by_ptr.values() for n in names}


# --------------------------------------------------------------------------------------------------- loading


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Model:
    """The model of a run (its latest checkpoint, or the step directory given), in eval mode."""
    cfg, ckpt = load_config_of(path)
    return _restore(cfg, ckpt, device)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[Model, Callable, Callable]:
    """Rebuild the model of a run in eval mode. Returns ``(model, preprocess, tokenizer)``:
    ``preprocess(PIL.Image) -> (3, H, W)``, ``tokenizer(list[str]) -> token ids``."""
    cfg, ckpt = load_config_of(path)
    model = _restore(cfg, ckpt, device)
    return model, model_transform(cfg.model), text_tokenizer(cfg, model)


def tower_embedder(cfg: Config, model: Model) -> tuple[Model, Callable]:
    """A model that embeds images and texts, for zero-shot and retrieval evaluation, and its tokenizer: ``model``
    itself when it embeds; for a decoder run, the CLIP run its tower came from (``model.bridge.tower``) with the
    decoder's own image tower in place (equal to it while the tower stayed frozen; what training moved shows)."""
    if model.supports("embed"):
        return model, build_tokenizer(cfg.model.text)
    source = cfg.model.bridge.tower if cfg.model.kind == "decoder" else None
    clip_cfg = load_config_of(source)[0] if source and not (Path(source) / "config.json").is_file() else None
    if clip_cfg is None or clip_cfg.model.kind != "clip":
        raise CheckpointError(f"{type(model).__name__} (model.kind {cfg.model.kind}) embeds no text; zero-shot and "
                              "retrieval of its tower use the text tower of the CLIP run the tower came from, and "
                              f"model.bridge.tower names {'no run' if not source else source + ', which is not one'}")
    clip = load_model(source)
    embedder = build_model(clip_cfg.model)
    embedder.load_state_dict(clip.state_dict())
    embedder.image_tower.load_state_dict(model.image_tower.state_dict())
    return embedder.to(next(model.parameters()).device).eval(), build_tokenizer(clip_cfg.model.text)


def text_tokenizer(cfg: Config, model: Model) -> Callable:
    """The tokenizer of a model's text: a decoder model's prompt tokenizer (its LM's own tokenizer and template),
    else the text tower's."""
    return model.text_tokenizer() if model.supports("decoder") else build_tokenizer(cfg.model.text)


def _restore(cfg: Config, ckpt: Path, device: str | torch.device) -> Model:
    model = build_model(cfg.model, resolve_parts(cfg.model))
    load_model_weights(model, ckpt / WEIGHTS)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------- building


def build(cfg: ModelConfig) -> Model:
    """The model of ``cfg`` to train, with every part the config takes from another run, export or folder resolved,
    and a decoder model's previous stage loaded."""
    model = build_model(cfg, resolve_parts(cfg))
    d = decoder_config(cfg)
    if d is not None and d.previous_stage:
        load_previous_stage(model, d.previous_stage)
    return model


def decoder_config(cfg: ModelConfig) -> DecoderConfig | None:
    """The language model section of a decoder family (``model.bridge.decoder`` / ``model.blip2.decoder``)."""
    if cfg.kind == "decoder":
        return cfg.bridge.decoder
    if cfg.kind in ("blip2_stage2", "caption_lm"):
        return cfg.blip2.decoder
    return None


def resolve_parts(cfg: ModelConfig) -> Parts:
    """The parts ``cfg`` takes from elsewhere; families that take none get empty :class:`Parts`."""
    resolver = RESOLVERS.get(cfg.kind)
    return resolver(cfg) if resolver is not None else Parts()


def check_preprocessing(ours: ImageTowerConfig, theirs: ImageTowerConfig, where: str, names: tuple[str, ...]) -> None:
    """A tower taken from ``where`` must see images prepared as ``model.image`` prepares them."""
    for name in names:
        a, b = _plain(getattr(ours, name)), _plain(getattr(theirs, name))
        if a != b:
            raise CheckpointError(
                f"model.image.{name} is {a!r} but the tower in {where} expects {b!r}; set model.image to that "
                "tower's settings (copy its model.image section) so the data pipeline feeds it what it was trained on"
            )


def _plain(v: object) -> object:
    return tuple(float(x) for x in v) if isinstance(v, list | tuple) else v


def frozen_tower(cfg: ModelConfig, tower_run: str | None = None, features: str | None = None) -> ImageTower:
    """A frozen image tower: that of the run ``tower_run``, or a fresh ``model.image``; with a ``features``
    directory, the weights of the tower those features were extracted with."""
    if tower_run:
        run_cfg, _ = load_config_of(tower_run)
        check_preprocessing(cfg.image, run_cfg.model.image, tower_run, ("name", "image_size", "mean", "std"))
        tower = load_model(tower_run).image_tower
    else:
        tower = ImageTower(cfg.image, cfg.embed_dim)
    if features and (Path(features) / FEATURES_TOWER).is_file():
        load_model_weights(tower, Path(features) / FEATURES_TOWER)
    tower.requires_grad_(False)
    return tower.eval()


def _stage1_parts(cfg: ModelConfig) -> Parts:
    return Parts(image=frozen_tower(cfg, cfg.blip2.tower, cfg.blip2.features))


def _stage2_parts(cfg: ModelConfig) -> Parts:
    parts = _lm_parts(cfg.blip2.decoder, cfg)
    if cfg.blip2.stage1:
        stage1 = load_model(cfg.blip2.stage1)
        if not isinstance(stage1, Blip2Stage1):
            raise CheckpointError(f"model.blip2.stage1 must be a blip2_stage1 run; {cfg.blip2.stage1} is not")
        parts.image, parts.qformer = stage1.tower, stage1.qformer
    else:
        parts.image = frozen_tower(cfg, cfg.blip2.tower, cfg.blip2.features)
    return parts


def _lm_parts(d: DecoderConfig, cfg: ModelConfig) -> Parts:
    """The decoder's language model and tokenizer: the project's own (fresh, or with ``weights``) or a Hugging Face
    causal LM from a local folder (``hf_path``) or a config (``hf_config`` + ``tokenizer``)."""
    if d.source == "own":
        lm, codec = own_lm(d, cfg)
        if d.weights:
            load_decoder_weights(lm, d.weights)
        return Parts(lm=lm, codec=codec, lm_pretrained=bool(d.weights))
    if d.source != "hf":
        raise CheckpointError(f"the decoder's source must be own or hf, got '{d.source}'")
    hf, tok = hf_causal_lm(d)
    lm = HFLanguageModel(hf)
    if d.weights:
        load_decoder_weights(lm, d.weights)
    return Parts(lm=lm, codec=HFCodec(tok, d.system), lm_pretrained=bool(d.hf_path or d.weights))


def _caption_lm_parts(cfg: ModelConfig) -> Parts:
    return _lm_parts(cfg.blip2.decoder, cfg)


def _bridge_parts(cfg: ModelConfig) -> Parts:
    b = cfg.bridge
    parts = _lm_parts(b.decoder, cfg)
    if b.tower:
        tower = load_exported_tower(b.tower)
        check_preprocessing(cfg.image, tower.cfg, b.tower, ("image_size", "mean", "std"))
        parts.image, parts.tower_frozen = tower, b.tower_locked
    return parts


RESOLVERS: dict[str, Callable[[ModelConfig], Parts]] = {
    "blip2_stage1": _stage1_parts,
    "blip2_stage2": _stage2_parts,
    "caption_lm": _caption_lm_parts,
    "decoder": _bridge_parts,
}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards": one per load or save of a local
    folder, noise in a command) off while inside; the previous setting is restored. A no-op without transformers."""
    if importlib.util.find_spec("transformers") is None:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def hf_causal_lm(d: DecoderConfig) -> tuple[nn.Module, object]:
    """A transformers causal LM and its tokenizer from a local folder (``hf_path``), or a fresh one built from
    ``hf_config`` with the tokenizer folder ``tokenizer``; never downloaded."""
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError("a decoder of source hf needs the transformers package (pip install transformers)") from e
    transformers.utils.logging.disable_progress_bar()  # one bar per tensor group, on every load: noise here
    if d.hf_path:
        folder = lm_folder(d.hf_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if "model_type" not in d.hf_config:
        raise CheckpointError("the decoder's hf_config needs a model_type (e.g. llama, qwen2 or gpt2), or set hf_path "
                              "to a local model folder")
    if not d.tokenizer:
        raise CheckpointError("a decoder built from hf_config needs its tokenizer: set the decoder's tokenizer to a "
                              "local tokenizer folder (tokenizer.json / tokenizer_config.json)")
    kwargs = dict(d.hf_config)
    hf_cfg = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    tok_dir = Path(d.tokenizer)
    if not tok_dir.is_dir():
        raise CheckpointError(f"the decoder's tokenizer folder {tok_dir} does not exist; give a local folder")
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if len(tok) > hf_cfg.vocab_size:
        raise CheckpointError(f"the tokenizer in {tok_dir} has {len(tok)} tokens but hf_config's vocab_size is "
                              f"{hf_cfg.vocab_size}; set vocab_size >= {len(tok)}")
    return transformers.AutoModelForCausalLM.from_config(hf_cfg), tok


def load_decoder_weights(lm: nn.Module, path: str) -> None:
    """Weights from a ``.safetensors`` file of the language model, or from a run of kind ``caption_lm``."""
    if Path(path).suffix == ".safetensors":
        load_model_weights(lm, path)
        return
    model = load_model(path)
    if not isinstance(model, CaptionLM):
        raise CheckpointError(f"{path} holds no decoder; point the decoder's weights at a caption_lm run")
    lm.load_state_dict(model.lm.state_dict())


def load_previous_stage(model: Model, path: str) -> None:
    """Start a stage from an earlier stage's run: every tensor it saved is loaded (it saved what it trained); the
    model's other tensors keep what the config built (a pretrained LM, a tower of another run, fresh new parts)."""
    cfg, ckpt = load_config_of(path)
    tensors = read_weights(ckpt / WEIGHTS)
    own = unwrap(model).state_dict()
    aliases = _shared_aliases(unwrap(model))
    names = {n for k in own for n in [k, *aliases.get(k, [])]}
    unknown = [k for k in tensors if k not in names]
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items()
              if k in own and v.shape != own[k].shape]
    if unknown or shapes:
        what = ("tensors not in this model: " + ", ".join(unknown[:6])) if unknown else (
            "tensors of another shape: " + "; ".join(shapes[:6]))
        raise CheckpointError(f"the previous stage {path} (model.kind {cfg.model.kind}) does not fit this model ({what}); "
                              "a stage starts from a run of the same model with the same bridge and decoder")
    with torch.no_grad():
        for k, v in own.items():
            src = tensors.get(k)
            if src is None:
                src = next((tensors[a] for a in aliases.get(k, []) if a in tensors), None)
            if src is not None:
                v.copy_(src)


def load_exported_tower(path: str | Path) -> ImageTower:
    """An :class:`ImageTower` from a timm export directory (``config.json`` + ``model.safetensors``) or a run dir."""
    p = Path(path)
    cfg_file = p / "config.json"
    if cfg_file.is_file() and "architecture" in (cfg := json.loads(cfg_file.read_text())):
        return _timm_export_tower(p, cfg)
    if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir() or (p / WEIGHTS).is_file():
        return load_model(p).image_tower
    raise CheckpointError(f"{p} is neither a timm export directory (config.json with 'architecture') nor a run directory")


def _timm_export_tower(p: Path, cfg: dict) -> ImageTower:
    meta = cfg.get("contrast", {})
    pc = cfg["pretrained_cfg"]
    icfg = ImageTowerConfig(
        name=cfg["architecture"],
        kwargs={k: v for k, v in cfg.get("model_args", {}).items() if k not in ("num_classes", "img_size")},
        image_size=int(pc["input_size"][-1]),
        pool=meta.get("pool", "default"),
        mean=tuple(pc["mean"]),
        std=tuple(pc["std"]),
    )
    E = int(meta.get("embed_dim", cfg.get("num_classes") or 0))
    if E <= 0:
        raise CheckpointError(f"{p} is a timm export without a projection; it was not written by contrast export")
    tower = ImageTower(icfg, E)
    sd = read_weights(p / WEIGHTS)
    clf = pc.get("classifier", "head")
    if meta.get("projection") == "head":
        tower.proj.weight.data.copy_(sd.pop(f"{clf}.weight"))
        sd.pop(f"{clf}.bias", None)
    else:
        tower.proj.weight.data.copy_(read_weights(p / "projection.safetensors")["weight"])
    tower.backbone.load_state_dict(sd, strict=True)
    return tower.eval()
