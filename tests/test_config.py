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


def init_run(tmp_path):
    """A run for the recipes that start from another run's weights (train.init_from) to name."""
    save_config(Config(), tmp_path / "config.yaml")
    return tmp_path


def shipped_recipe(recipe, tmp_path):
    """A shipped recipe, loaded; one that starts from another run (train.init_from) gets a run made here."""
    starts = "init_from:" in recipe.read_text()
    return load_recipe(recipe, [f"train.init_from={init_run(tmp_path)}"] if starts else []), starts


def test_shipped_recipes_load(tmp_path):
    from pathlib import Path

    for recipe in sorted(Path("recipes").glob("*.yaml")):
        shipped_recipe(recipe, tmp_path)


def test_unknown_model_kind_is_an_error():
    from contrast.models import build_model

    cfg = Config()
    cfg.model.kind = "blpi"
    with pytest.raises(ConfigError, match="did you mean 'blip'"):
        build_model(cfg.model)


def test_each_family_defaults_its_own_loss_weights():
    from contrast.config import from_dict

    weights = {k: (c.loss.itc, c.loss.sigmoid, c.loss.itm, c.loss.lm)
               for k in ("clip", "blip", "blip2_stage1", "blip2_stage2", "caption_lm", "decoder")
               for c in [from_dict({"model": {"kind": k}})]}
    assert weights == {
        "clip": (1.0, 0.0, 0.0, 0.0), "blip": (1.0, 0.0, 1.0, 1.0), "blip2_stage1": (1.0, 0.0, 1.0, 1.0),
        "blip2_stage2": (0.0, 0.0, 0.0, 1.0), "caption_lm": (0.0, 0.0, 0.0, 1.0), "decoder": (0.0, 0.0, 0.0, 1.0),
    }
    # an explicit weight still wins over the family's default
    assert from_dict({"model": {"kind": "decoder"}, "loss": {"itc": 0.5}}).loss.itc == 0.5


def test_a_section_of_another_family_is_named():
    from contrast.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"model.qformer belongs to model.kind blip2_stage1 / blip2_stage2"):
        from_dict({"model": {"kind": "clip", "qformer": {"width": 64}}})


def test_moved_keys_say_what_to_write_instead():
    from contrast.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"'model.text.unlocked_layers' is now 'model.text.unlocked_groups'"):
        from_dict({"model": {"text": {"unlocked_layers": 1}}})


def test_image_size_is_stated_once():
    from contrast.config import ConfigError, from_dict

    # an older recipe repeating the size in data.synthetic still loads when the two agree ...
    cfg = from_dict({"model": {"image": {"image_size": 48}}, "data": {"synthetic": {"image_size": 48, "seed": 2}}})
    assert cfg.model.image.image_size == 48 and cfg.data.synthetic.seed == 2
    assert not hasattr(cfg.data.synthetic, "image_size")
    # ... and is refused, naming the one place, when they differ
    with pytest.raises(ConfigError, match="remove data.synthetic.image_size"):
        from_dict({"model": {"image": {"image_size": 48}}, "data": {"synthetic": {"image_size": 32}}})


def test_every_shipped_recipe_loads(tmp_path):
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
    assert len(recipes) >= 10
    for r in recipes:
        cfg, starts = shipped_recipe(r, tmp_path)
        assert starts or cfg.model.kind in r.read_text()  # an init_from recipe's kind is its starting run's


def test_runs_saved_by_earlier_versions_keep_loading(tmp_path):
    """Earlier versions saved every family's model section, data.synthetic.image_size and text.unlocked_layers."""
    import yaml

    from contrast.config import ConfigError, load_config

    old = {
        "model": {"kind": "clip", "embed_dim": 64, "image": {"image_size": 24}, "text": {"unlocked_layers": 1},
                  "qformer": {"num_queries": 32}, "blip2": {"tower": None}, "blip": {"momentum": 0.995},
                  "bridge": {"mode": "unified"}},
        "data": {"synthetic": {"image_size": 24, "train_size": 100}},
        "loss": {"itc": 1.0, "sigmoid": 0.0, "itm": 0.0, "lm": 0.0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_config(tmp_path / "config.yaml")
    assert (cfg.model.embed_dim, cfg.model.image.image_size, cfg.model.text.unlocked_groups) == (64, 24, 1)
    assert cfg.data.synthetic.train_size == 100 and not hasattr(cfg.model, "qformer")
    # the same content as a recipe is refused with the fix named
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="unlocked_groups|belongs to model.kind"):
        load_recipe(tmp_path / "recipe.yaml")
