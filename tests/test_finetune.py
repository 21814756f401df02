"""Fine-tuning levers: starting from another run's weights (train.init_from), layer-wise learning-rate decay
(train.layer_decay), a moving average of the weights (train.ema), and WiSE-FT of a run that started from another."""

import json
import math

import pytest
import torch
import yaml
from conftest import StoppedAfterCheckpoint, stop_after_first_checkpoint, tiny_config

import contrast
from contrast import runs as R
from contrast.config import ConfigError, load_recipe, save_config
from contrast.models import build_model
from contrast.train.evals import Evaluator
from contrast.train.loop import train
from contrast.train.optim import param_groups
from contrast.train.wise import wise_ft


def two_layer_config(cache=None, **train_kw):
    cfg = tiny_config(cache, **train_kw)
    cfg.model.image.kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
    cfg.model.text.layers = 2
    return cfg


def lr_of(groups):
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_layer_decay_scales_each_depth_as_beit():
    """Of a tower's n depth groups (embeddings, then each block), group i trains at lr * decay ** (n - i); the
    projections, final norms and logit scale at the full rate (counted here from the module structure)."""
    cfg = two_layer_config()
    cfg.train.lr, cfg.train.image_lr, cfg.train.text_lr, cfg.train.layer_decay = 1e-3, 4e-4, 2e-4, 0.5
    model = build_model(cfg.model)
    lrs = lr_of(param_groups(model, cfg.train))
    vit = model.image.backbone
    n = len(vit.blocks) + 1  # the patch embedding (with class token and positions), then 3 blocks
    for k, blk in enumerate(vit.blocks):
        assert [lrs[id(p)] for p in blk.parameters()] == pytest.approx([4e-4 * 0.5 ** (n - (k + 1))] * len(list(blk.parameters())))
    assert lrs[id(vit.patch_embed.proj.weight)] == pytest.approx(4e-4 * 0.5**n)
    assert lrs[id(vit.cls_token)] == pytest.approx(4e-4 * 0.5**n)
    text = model.text
    m = len(text.transformer.blocks) + 1
    for k, blk in enumerate(text.transformer.blocks):
        assert [lrs[id(p)] for p in blk.parameters()] == pytest.approx([2e-4 * 0.5 ** (m - (k + 1))] * len(list(blk.parameters())))
    assert lrs[id(text.token_embedding.weight)] == pytest.approx(2e-4 * 0.5**m)
    assert lrs[id(text.ln_final.weight)] == pytest.approx(2e-4)
    for p in (model.image.proj.weight, model.text.proj.weight, model.logit_scale):
        assert lrs[id(p)] == pytest.approx(1e-3)
    # every trainable parameter is in exactly one group
    assert len(lrs) == sum(1 for p in model.parameters() if p.requires_grad)


def test_layer_decay_one_or_none_changes_nothing_and_bad_values_are_refused():
    cfg = two_layer_config()
    model = build_model(cfg.model)
    plain = lr_of(param_groups(model, cfg.train))
    cfg.train.layer_decay = 1.0
    assert lr_of(param_groups(model, cfg.train)) == plain
    for bad in (0.0, 1.5, -0.2):
        cfg.train.layer_decay = bad
        with pytest.raises(ConfigError, match="layer_decay"):
            param_groups(model, cfg.train)


def test_layer_decay_on_a_cnn_and_an_hf_text_tower(tmp_path):
    """timm's fine groups of a CNN (stem, each block) and a Hugging Face encoder's layers get decayed rates too."""
    import transformers
    from import_helpers import word_tokenizer

    folder = tmp_path / "bert"
    vocab = word_tokenizer(folder, 16)
    transformers.BertModel(transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                                                   num_attention_heads=2, intermediate_size=64, pad_token_id=0,
                                                   max_position_embeddings=32)).save_pretrained(str(folder))
    cfg = tiny_config()
    cfg.model.image.name, cfg.model.image.kwargs = "resnet10t", {}
    cfg.model.text.kind, cfg.model.text.hf_path = "hf", str(folder)
    cfg.train.layer_decay = 0.5
    model = build_model(cfg.model)
    lrs = lr_of(param_groups(model, cfg.train))
    stem = model.image.backbone.conv1[0].weight
    last = model.image.backbone.layer4[0].conv1.weight
    assert lrs[id(last)] == pytest.approx(1e-3 * 0.5)
    assert lrs[id(stem)] < lrs[id(last)] * 0.5**2
    layers = model.text.layers
    for k, layer in enumerate(layers):
        assert [lrs[id(p)] for p in layer.parameters()] == pytest.approx([1e-3 * 0.5 ** (len(layers) - k)] * len(list(layer.parameters())))


def test_init_from_takes_the_runs_model_and_weights(tmp_path, data_cache):
    train(tiny_config(data_cache, steps=2), tmp_path / "a", progress=False)
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"source": "synthetic", "cache_dir": str(data_cache),
                                               "synthetic": {"train_size": 256, "val_size": 32, "test_size": 64}},
                                      "train": {"init_from": str(tmp_path / "a"), "steps": 0, "batch_size": 16},
                                      "model": {"text": {"locked": True}}}))
    cfg = load_recipe(recipe)
    assert cfg.model.embed_dim == 32 and cfg.model.image.kwargs["depth"] == 1  # the run's model section
    assert cfg.model.text.locked  # the recipe's key over it
    train(cfg, tmp_path / "b", progress=False)
    a, b = R.read_weights(R.resolve(tmp_path / "a") / R.WEIGHTS), R.read_weights(R.resolve(tmp_path / "b") / R.WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_errors_are_one_line(tmp_path, data_cache):
    with pytest.raises(ConfigError, match="init_from .* does not exist"):
        load_recipe_with(tmp_path, {"train": {"init_from": str(tmp_path / "nowhere")}})
    train(tiny_config(data_cache, steps=1), tmp_path / "a", progress=False)
    cfg = load_recipe_with(tmp_path, {"train": {"init_from": str(tmp_path / "a"), "steps": 1},
                                      "model": {"embed_dim": 16}})
    with pytest.raises(ConfigError, match="init_from .*differ in shape.*remove the model keys"):
        train(cfg, tmp_path / "b", progress=False)
    cfg = load_recipe_with(tmp_path, {"train": {"init_from": str(tmp_path / "a"), "head_init": "cca"}})
    with pytest.raises(ConfigError, match="head_init: cca would replace the projections"):
        train(cfg, tmp_path / "c", progress=False)


def load_recipe_with(tmp_path, data):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_recipe(p)


def ema_reference(weights: list[dict], decay: float) -> dict:
    """The average by its definition, in float64: avg_0 = w_0, avg_n = d_n avg_{n-1} + (1 - d_n) w_n,
    d_n = min(decay, n / (9 + n)) for the n-th update (n from 1)."""
    avg = {k: v.double() for k, v in weights[0].items()}
    for n, w in enumerate(weights[1:], start=1):
        d = min(decay, n / (9 + n))
        avg = {k: d * avg[k] + (1 - d) * w[k].double() for k in avg}
    return avg


def test_ema_follows_its_definition_and_is_a_run_of_its_own(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=5, checkpoint_every=1, keep_checkpoints=10, ema=0.6)
    cfg.eval.retrieval_split, cfg.eval.retrieval_limit = "val", 32
    result = train(cfg, tmp_path / "run", progress=False)
    start = tiny_config(data_cache, steps=0)
    train(start, tmp_path / "start", progress=False)  # the same seed: the weights the run started from
    steps = [R.read_weights(R.resolve(tmp_path / "start") / R.WEIGHTS)]
    steps += [R.read_weights(R.step_dir(tmp_path / "run", s) / R.WEIGHTS) for s in range(1, 6)]
    trainable = [n for n, p in build_model(cfg.model).named_parameters() if p.requires_grad]
    ref = ema_reference([{k: w[k] for k in trainable} for w in steps], 0.6)
    saved = R.read_weights(R.step_dir(tmp_path / "run", 5) / "ema.safetensors")
    for k in trainable:
        torch.testing.assert_close(saved[k].double(), ref[k], rtol=0, atol=1e-6)
    assert not torch.equal(saved["image.proj.weight"], steps[-1]["image.proj.weight"])
    # RUN/ema loads like any run and its evaluation is the ema/ metrics of the run's last evaluation
    model = contrast.load(tmp_path / "run" / "ema")[0]
    torch.testing.assert_close(model.state_dict()["text.proj.weight"].double(), ref["text.proj.weight"], atol=1e-6,
                               rtol=0)
    assert "retrieval/image_to_text/R@1" in result.metrics
    own = Evaluator(cfg, model, torch.device("cpu"))(model)
    assert own == {k.removeprefix("ema/"): v for k, v in result.metrics.items() if k.startswith("ema/")}
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("ema/retrieval/text_to_image/R@1" in json.dumps(r) for r in evals)


def test_ema_resumes_exactly(tmp_path, data_cache, monkeypatch):
    full = tiny_config(data_cache, steps=6, checkpoint_every=3, ema=0.9)
    train(full, tmp_path / "full", progress=False)
    with monkeypatch.context() as m:
        stop_after_first_checkpoint(m)
        with pytest.raises(StoppedAfterCheckpoint):
            train(tiny_config(data_cache, steps=6, checkpoint_every=3, ema=0.9), tmp_path / "part", progress=False)
    train(tiny_config(data_cache, steps=6, checkpoint_every=3, ema=0.9), tmp_path / "part", resume="latest",
          progress=False)
    a = R.read_weights(R.step_dir(tmp_path / "full", 6) / "ema.safetensors")
    b = R.read_weights(R.step_dir(tmp_path / "part", 6) / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_values_are_checked():
    with pytest.raises(ConfigError, match="train.ema"):
        from contrast.train.ema import Ema

        Ema(build_model(tiny_config().model), 1.5)


def test_wise_ft_of_a_run_started_from_another(tmp_path, data_cache):
    """alpha 0 gives the run it started from (every tensor, projections included), alpha 1 the fine-tuned one."""
    train(tiny_config(data_cache, steps=2), tmp_path / "a", progress=False)
    ft = tiny_config(data_cache, steps=3, init_from=str(tmp_path / "a"))
    ft.model = R.load_config_of(tmp_path / "a")[0].model
    train(ft, tmp_path / "b", progress=False)
    a = R.read_weights(R.resolve(tmp_path / "a") / R.WEIGHTS)
    b = R.read_weights(R.resolve(tmp_path / "b") / R.WEIGHTS)
    half, names = wise_ft(tmp_path / "b", 0.5, tmp_path / "w")
    assert "image.proj.weight" in names and "logit_scale" in names
    w = R.read_weights(tmp_path / "w" / R.WEIGHTS)
    for k in names:
        torch.testing.assert_close(w[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-6)
    wise_ft(tmp_path / "b", 0.0, tmp_path / "w0")
    w0 = R.read_weights(tmp_path / "w0" / R.WEIGHTS)
    assert all(torch.equal(w0[k], a[k]) for k in a)
    assert math.isfinite(float(w["logit_scale"]))


def test_saved_config_of_an_init_from_run_stands_alone(tmp_path, data_cache):
    train(tiny_config(data_cache, steps=1), tmp_path / "a", progress=False)
    cfg = load_recipe_with(tmp_path, {"train": {"init_from": str(tmp_path / "a"), "steps": 0},
                                      "data": {"cache_dir": str(data_cache)}})
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved["model"]["embed_dim"] == 32 and saved["train"]["init_from"] == str(tmp_path / "a")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_finetune_recipes_train_an_imported_model(tmp_path, kind):
    """The shipped fine-tuning recipes on a Hugging Face CLIPModel / SiglipModel imported by contrast import: every
    tower layer trains (both towers unlocked), the loss is the family's own (SigLIP: the sigmoid term with its bias),
    the run starts from the imported weights and leaves its moving average as RUN/ema."""
    from test_import_hf_clip import _folder

    from contrast.export import import_checkpoint

    folder, _ = _folder(tmp_path, kind)
    start = import_checkpoint(folder, tmp_path / "imported")
    recipe = R.Path(__file__).resolve().parents[1] / "recipes" / f"finetune_{kind}_emoji.yaml"
    cfg = load_recipe(recipe, [f"train.init_from={start}", "data.source=synthetic", "train.steps=2",
                               "train.batch_size=8", "train.warmup_steps=1", "eval.tasks=[]",
                               "eval.retrieval_split=null", "data.augment.enabled=false",
                               "data.synthetic={train_size: 64, val_size: 16, test_size: 16}"])
    assert (cfg.model.init_logit_bias is not None) == (kind == "siglip")
    train(cfg, tmp_path / "ft", progress=False)
    before = R.read_weights(R.resolve(start) / R.WEIGHTS)
    after = R.read_weights(R.resolve(tmp_path / "ft") / R.WEIGHTS)
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"image", "text"} <= moved
    assert not torch.equal(after["image.backbone.patch_embed.proj.weight"],
                           before["image.backbone.patch_embed.proj.weight"])  # the first layer trains too
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    terms = {k for r in rows for k in r if k.startswith("loss/")}
    assert terms == ({"loss/sigmoid"} if kind == "siglip" else {"loss/itc"})
    assert (tmp_path / "ft" / "ema" / "config.yaml").is_file()


def test_frozen_norm_stats_keep_running_statistics_while_weights_train(data_cache, tmp_path):
    cfg = tiny_config(data_cache, steps=2)
    cfg.model.image.name, cfg.model.image.kwargs = "resnet10t", {}
    cfg.model.image.frozen_norm_stats = True
    model = build_model(cfg.model)
    model.train()
    bn = [m for m in model.image.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn) and model.image.backbone.conv1[0].weight.requires_grad
    start = dict(build_model(cfg.model).state_dict())
    for frozen in (True, False):
        cfg.model.image.frozen_norm_stats = frozen
        train(cfg, tmp_path / str(frozen), progress=False)
        after = R.read_weights(R.resolve(tmp_path / str(frozen)) / R.WEIGHTS)
        assert torch.equal(after["image.backbone.bn1.running_mean"], start["image.backbone.bn1.running_mean"]) == frozen
        assert not torch.equal(after["image.backbone.bn1.weight"], start["image.backbone.bn1.weight"])
