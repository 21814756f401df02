import pytest
import yaml

from contrast.config import Config, ConfigError, load_config, load_recipe, save_config


def write(tmp_path, data):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_section_and_nearest(tmp_path):
    p = write(tmp_path, {"train": {"setps": 10}})
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "'setps'" in msg and "section 'train'" in msg and "did you mean 'steps'" in msg


def test_unknown_nested_key_and_top_level(tmp_path):
    with pytest.raises(ConfigError, match=r"section 'model.image'.*did you mean 'kwargs'"):
        load_recipe(write(tmp_path, {"model": {"image": {"kwarg": {}}}}))
    with pytest.raises(ConfigError, match=r"the top level.*did you mean 'train'"):
        load_recipe(write(tmp_path, {"trian": {}}))


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer"):
        load_recipe(write(tmp_path, {"train": {"steps": "many"}}))
    with pytest.raises(ConfigError, match=r"train.lr: expected a number"):
        load_recipe(write(tmp_path, {"train": {"lr": True}}))
    with pytest.raises(ConfigError, match=r"train.betas: expected 2 values"):
        load_recipe(write(tmp_path, {"train": {"betas": [0.9]}}))


def test_overrides_are_type_checked(tmp_path):
    p = write(tmp_path, {"train": {"steps": 10}})
    cfg = load_recipe(p, ["train.steps=200", "train.lr=3e-4", "model.image.kwargs={depth: 2}"])
    assert cfg.train.steps == 200 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.image.kwargs == {"depth": 2}
    assert isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_recipe(p, ["train.steps=1.5"])
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_recipe(p, ["train.batchsize=3"])
    with pytest.raises(ConfigError, match="form section.key=value"):
        load_recipe(p, ["train.steps"])


def test_missing_recipe_says_where_recipes_are(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found.*recipes/"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = Config()
    cfg.train.steps = 7
    cfg.model.image.kwargs = {"depth": 3}
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg


def test_shipped_recipes_load():
    from pathlib import Path

    for recipe in sorted(Path("recipes").glob("*.yaml")):
        load_recipe(recipe)


def test_unknown_model_kind_is_an_error():
    from contrast.models import build_model

    cfg = Config()
    cfg.model.kind = "blpi"
    with pytest.raises(ConfigError, match="did you mean 'blip'"):
        build_model(cfg.model)
