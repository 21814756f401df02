"""WiSE-FT (contrast.train.wise): unlocked pretrained tower layers averaged with their pretrained weights; projections,
logit scale and locked layers as trained; refused for a run that changed no pretrained weight."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from contrast import runs as R
from contrast.train.loop import train
from contrast.train.wise import WiseError, interpolate, wise_ft


def _save_backbone(image_cfg, path) -> dict[str, torch.Tensor]:
    """A 'pretrained' image backbone file for ``image_cfg``: drawn once with its own seed. Returns its tensors under
    the model's names."""
    from contrast.towers import ImageTower

    torch.manual_seed(123)
    tower = ImageTower(dataclasses.replace(image_cfg, weights=None), embed_dim=8)
    save_file({k: v.contiguous() for k, v in tower.backbone.state_dict().items()}, str(path))
    return {f"image.backbone.{k}": v.clone() for k, v in tower.backbone.state_dict().items()}


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("wise")
    cfg = tiny_config(data_cache, steps=3, batch_size=16, warmup_steps=0, lr=5e-2)
    cfg.model.image.kwargs = {**cfg.model.image.kwargs, "depth": 2}
    pretrained = _save_backbone(cfg.model.image, tmp / "backbone.safetensors")
    cfg.model.image.weights = str(tmp / "backbone.safetensors")
    cfg.model.image.locked, cfg.model.image.unlocked_groups = True, 1  # the last block trains
    cfg.model.text.locked = True  # random-init text transformer, locked: not pretrained, never averaged
    cfg.data.augment.enabled = False
    train(cfg, tmp / "run", progress=False)
    return tmp, pretrained


def test_wise_averages_only_the_unlocked_pretrained_tensors(tuned_run):
    tmp, pretrained = tuned_run
    tuned = load_file(str(R.resolve(tmp / "run") / R.WEIGHTS))
    out, names = wise_ft(tmp / "run", 0.25, tmp / "wise")
    averaged = set(names)
    model = R.load(tmp / "run")[0]
    model.image.lock(1)  # the run's trainable parameters, as its config locked them
    unlocked = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("image.backbone.")}
    assert averaged == unlocked and any(n.startswith("image.backbone.blocks.1.") for n in averaged)
    mixed = load_file(str(R.resolve(out) / R.WEIGHTS))
    for k, v in mixed.items():
        if k in averaged:
            torch.testing.assert_close(v, 0.75 * pretrained[k] + 0.25 * tuned[k], rtol=1e-6, atol=1e-7)
        else:  # projections, logit scale, locked blocks, the random-init text tower: as trained
            assert torch.equal(v, tuned[k]), k
    assert not torch.equal(tuned["image.proj.weight"], torch.zeros_like(tuned["image.proj.weight"]))
    model, _, _ = R.load(out)  # the written directory loads as a run
    assert torch.equal(model.state_dict()["image.backbone.blocks.1.mlp.fc1.weight"],
                       mixed["image.backbone.blocks.1.mlp.fc1.weight"])


def test_wise_alpha_zero_restores_the_pretrained_layers_and_checks_its_input(tuned_run):
    tmp, pretrained = tuned_run
    out, names = wise_ft(tmp / "run", 0.0, tmp / "wise0")
    mixed = load_file(str(R.resolve(out) / R.WEIGHTS))
    for k in names:
        assert torch.equal(mixed[k], pretrained[k]), k
    with pytest.raises(WiseError, match="between 0"):
        interpolate({}, {}, 1.5, set())
    with pytest.raises(WiseError, match="is the run itself"):
        wise_ft(tmp / "run", 0.5, tmp / "run")


def test_wise_refuses_a_run_with_locked_towers(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=1, batch_size=16, warmup_steps=0)
    cfg.model.image.locked = cfg.model.text.locked = True
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(WiseError, match="changed no pretrained weights"):
        wise_ft(tmp_path / "run", 0.5, tmp_path / "wise")
