"""WiSE-FT: a weight-space ensemble of a fine-tuned model and the pretrained weights it started from.

Reference: Wortsman et al., "Robust fine-tuning of zero-shot models" (WiSE-FT), CVPR 2022.

For a LiT run whose towers were (partly) unlocked, each tensor the run both *received from pretrained weights* and
*changed* becomes ``(1 - alpha) * initial + alpha * fine_tuned``: ``alpha = 1`` is the fine-tuned run, ``alpha = 0``
puts the unlocked tower layers back to their pretrained weights. Everything else keeps the fine-tuned value: the
projections and the logit scale (they start from a random draw, so there is no zero-shot value to return to) and
the locked layers (unchanged anyway). A tensor comes from pretrained weights when it belongs to a tower whose config
loads weights (``model.image.weights``; ``model.text.kind: hf``) and the model as built gives it the same value under
two different seeds (weights load the same way every time; the tower's projection, drawn at random, does not).
Dual encoders (``model.kind: clip``) only. A run started from another run's weights (``train.init_from``: an imported
CLIP or SigLIP being fine-tuned) averages every tensor with that run's value instead (:func:`starting_weights`).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from contrast.config import Config, ModelConfig
from contrast.errors import CheckpointError, UserError
from contrast.runs import WEIGHTS, build, load_config_of, read_weights, resolve, run_dir_of


class WiseError(UserError, ValueError):
    """A WiSE-FT request that cannot be carried out."""


def _initial_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    random.seed(seed)
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build(cfg).state_dict().items()}


def pretrained_towers(cfg: ModelConfig) -> tuple[str, ...]:
    """The state-dict prefixes of a dual encoder's towers that load pretrained weights."""
    if cfg.kind != "clip":
        raise WiseError(f"WiSE-FT averages the towers of a dual encoder (model.kind clip); this run is {cfg.kind}")
    return tuple(p for p, loaded in (("image.", bool(cfg.image.weights)), ("text.", cfg.text.kind == "hf")) if loaded)


def pretrained_names(cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The initial weights of a model of ``cfg`` and the names of its floating tensors that come from pretrained
    weights (in a pretrained tower, equal under two seeds)."""
    towers = pretrained_towers(cfg)
    first, second = _initial_state(cfg, 0), _initial_state(cfg, 1)
    same = {k for k, v in first.items()
            if k.startswith(towers) and v.is_floating_point() and torch.equal(v, second[k])} if towers else set()
    return first, same


def starting_weights(cfg: Config) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A run that started from another run's weights (``train.init_from``, e.g. an imported CLIP): those weights, and
    every floating tensor among them. All of them count as pretrained, the projections and the logit scale too, so
    ``alpha = 0`` gives back the model the run started from, as in WiSE-FT's zero-shot end point."""
    try:
        initial = read_weights(resolve(Path(cfg.train.init_from).expanduser()) / WEIGHTS)
    except CheckpointError as e:
        raise WiseError(f"the run started from train.init_from {cfg.train.init_from}, whose weights WiSE-FT averages "
                        f"with: {str(e).splitlines()[0]}") from e
    return initial, {k for k, v in initial.items() if v.is_floating_point()}


def interpolate(initial: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float,
                names: set[str]) -> dict[str, torch.Tensor]:
    """``tuned`` with each tensor of ``names`` replaced by ``(1 - alpha) * initial + alpha * tuned``."""
    if not 0.0 <= alpha <= 1.0:
        raise WiseError(f"--alpha must lie between 0 (the pretrained weights) and 1 (the fine-tuned run), got {alpha}")
    out = dict(tuned)
    for k in names:
        out[k] = torch.lerp(initial[k].to(tuned[k].dtype), tuned[k], alpha)
    return out


def wise_ft(run: str | Path, alpha: float, out: str | Path) -> tuple[Path, list[str]]:
    """Write a run directory ``out`` (the run's config and averaged weights) for the run or checkpoint ``run``;
    returns it and the names of the averaged tensors. Refuses a run that changed no pretrained tensor."""
    cfg, ckpt = load_config_of(run)
    tuned = read_weights(ckpt / WEIGHTS)
    initial, pretrained = starting_weights(cfg) if cfg.train.init_from else pretrained_names(cfg.model)
    missing = sorted(set(initial) - set(tuned))
    if missing:
        raise WiseError(f"{ckpt / WEIGHTS} lacks tensors its config builds (e.g. {missing[0]}); is it this run's?")
    trained = sorted(k for k in pretrained if not torch.equal(initial[k], tuned[k]))
    if not trained:
        raise WiseError(f"the run {run} changed no pretrained weights (its towers were locked); WiSE-FT averages "
                        "unlocked tower layers with their pretrained values, so there is nothing to average")
    target = Path(out)
    if target.resolve() == run_dir_of(ckpt).resolve():
        raise WiseError(f"--out {target} is the run itself; choose a new directory")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir_of(ckpt) / "config.yaml", target / "config.yaml")
    weights = interpolate(initial, tuned, alpha, set(trained))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(target / WEIGHTS), metadata={"wise_ft_alpha": str(alpha)})
    return target, trained
