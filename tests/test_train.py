import json

import pytest
import torch
from conftest import StoppedAfterCheckpoint, stop_after_first_checkpoint, tiny_config
from PIL import Image

from contrast import runs as R
from contrast.data import DataError
from contrast.models import build_model
from contrast.objectives import build_objective
from contrast.tokenizer import build_tokenizer
from contrast.train import checkpoint as C
from contrast.train.loop import NonFiniteLossError, train
from contrast.train.optim import build_optimizer, lr_factor, param_groups


def losses_of(run_dir):
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in rows if "summary" not in r]


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tok = build_tokenizer(cfg.model.text)
    batch = {"pixels": torch.randn(8, 3, 16, 16), "input_ids": tok([f"a caption number {i}" for i in range(8)])}
    cfg.train.warmup_steps = 0
    opt = build_optimizer(model, cfg.train)
    objective = build_objective(cfg.loss)
    first = objective(model(batch)).total.item()
    for _ in range(10):
        loss = objective(model(batch)).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert objective(model(batch)).total.item() < first - 0.5


def test_param_groups_exempt_norms_biases_and_logit_scale():
    cfg = tiny_config()
    model = build_model(cfg.model)
    cfg.train.image_lr, cfg.train.text_lr = 1e-4, 2e-4
    groups = {g["name"]: g for g in param_groups(model, cfg.train)}
    assert set(groups) == {"image", "image_no_decay", "text", "text_no_decay", "head", "head_no_decay"}
    assert id(model.image.proj.weight) in {id(p) for p in groups["head"]["params"]}  # projections train at train.lr
    assert groups["image"]["lr"] == 1e-4 and groups["text"]["lr"] == 2e-4
    no_decay_ids = {id(p) for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.logit_scale) in no_decay_ids
    assert id(model.text.ln_final.weight) in no_decay_ids and id(model.text.ln_final.bias) in no_decay_ids
    assert id(model.text.proj.weight) not in no_decay_ids


def test_cosine_schedule_with_warmup():
    cfg = tiny_config(steps=110, warmup_steps=10)
    assert lr_factor(0, cfg.train) == pytest.approx(0.1)
    assert lr_factor(9, cfg.train) == pytest.approx(1.0)
    assert lr_factor(60, cfg.train) == pytest.approx(0.5)
    assert lr_factor(110, cfg.train) == pytest.approx(0.0)


def test_checkpoint_round_trip_and_foreign_checkpoint(tmp_path, data_cache):
    cfg = tiny_config(data_cache)
    result = train(cfg, tmp_path / "run", progress=False)
    ckpt = R.resolve(tmp_path / "run")
    assert ckpt == result.checkpoint and ckpt.name == "step_00000004"
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    import contrast

    model, preprocess, tok = contrast.load(tmp_path / "run")
    fresh = build_model(cfg.model)
    R.load_model_weights(fresh, ckpt / R.WEIGHTS)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    state = C.load_state(ckpt)
    assert state["step"] == 4 and "optimizer" in state
    other = tiny_config(data_cache)
    other.model.text.width = 48
    with pytest.raises(C.CheckpointError) as e:
        R.load_model_weights(build_model(other.model), ckpt / R.WEIGHTS)
    assert "different model config" in str(e.value) and "text.token_embedding.weight" in str(e.value)


def test_resumed_run_logs_the_same_losses(tmp_path, data_cache, monkeypatch):
    full = tiny_config(data_cache, steps=8, checkpoint_every=4)
    train(full, tmp_path / "full", progress=False)
    part = tiny_config(data_cache, steps=8, checkpoint_every=4)
    # stop after step 4 of the same 8-step schedule, as a crash would
    with monkeypatch.context() as m:
        stop_after_first_checkpoint(m)
        with pytest.raises(StoppedAfterCheckpoint):
            train(part, tmp_path / "part", progress=False)
    assert R.resolve(tmp_path / "part").name == "step_00000004"
    train(part, tmp_path / "part", resume="latest", progress=False)
    a, b = losses_of(tmp_path / "full"), losses_of(tmp_path / "part")
    assert [s for s, _ in a] == list(range(1, 9)) == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x == y


def test_interrupted_save_leaves_latest_intact(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=2)
    train(cfg, tmp_path / "run", progress=False)
    # a crash mid-save leaves only a temporary directory behind; latest still names the complete checkpoint
    (tmp_path / "run" / "checkpoints" / "step_00000003.tmp-999").mkdir()
    assert R.resolve(tmp_path / "run").name == "step_00000002"


def make_folder(tmp_path, n=40, corrupt=(3, 7), empty=(5,)):
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = []
    for i in range(n):
        f = folder / f"{i}.png"
        if i in corrupt:
            f.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        else:
            Image.new("RGB", (20, 20), (i * 5 % 255, 10, 200)).save(f)
        caption = "" if i in empty else f"a picture number {i}"
        lines.append(json.dumps({"file": f.name, "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines))
    return folder


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(tmp_path):
    folder = make_folder(tmp_path)
    cfg = tiny_config(steps=2, batch_size=36)
    cfg.data.source = str(folder)
    result = train(cfg, tmp_path / "run", progress=False)
    # the first 36 rows of the 40 are train (90/5/5): one epoch per step, so each step meets the two corrupt images
    # and the empty caption once (and a replacement drawn for them may be bad again)
    assert result.step == 2
    images = sum(n for cause, n in result.skipped.items() if "caption" not in cause)
    assert images >= 4 and result.skipped["empty_caption"] >= 2
    summary = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["skipped"] == result.skipped and summary["steps"] == 2


def test_missing_data_path_and_captions(tmp_path):
    cfg = tiny_config()
    cfg.data.source = str(tmp_path / "missing")
    with pytest.raises(DataError, match="data source not found"):
        train(cfg, tmp_path / "run", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.parquet").write_text("")
    cfg.data.source = str(tmp_path / "empty")
    (tmp_path / "empty" / "x.parquet").unlink()
    with pytest.raises(DataError, match="no captions file"):
        train(cfg, tmp_path / "run", progress=False)


def test_non_finite_loss_stops_with_a_saved_checkpoint(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=3)
    cfg.model.init_logit_scale = float("nan")
    with pytest.raises(NonFiniteLossError, match="Lower train.lr"):
        train(cfg, tmp_path / "run", progress=False)
    saved = R.resolve(tmp_path / "run")
    assert saved.name == "step_00000001"  # checked at the first logged step; its update was not applied
    weights = R.read_weights(saved / R.WEIGHTS)
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg.model).state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(v, fresh[k], equal_nan=True)
