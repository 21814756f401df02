"""Real decoders: Hugging Face causal LMs (Llama, Qwen2, GPT-2 architectures, tiny and random) with their own
tokenizers behind the unified bridge, the cross-attention bridge and BLIP-2 stage 2; prompts with a chat template and
the loss on the answer only; generation through the KV cache; training stages and what a checkpoint holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import StoppedAfterCheckpoint, stop_after_first_checkpoint
from lm_fixtures import hf_config, make_tokenizer, tiny_hf_folder

from contrast.bridges import UnifiedBridge, pixel_shuffle
from contrast.cli import main
from contrast.config import ConfigError, from_dict
from contrast.decoders import PromptError
from contrast.generate import beam_search, greedy, greedy_uncached, prompt_batch
from contrast.objectives import lm_loss
from contrast.runs import build, load, read_weights, resolve
from contrast.train.loop import train

TOWER = {"name": "vit_tiny_patch16_224", "image_size": 16,
         "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {arch: str(tiny_hf_folder(root / arch, arch)) for arch in ("llama", "qwen2", "gpt2")}


def _cfg(lm: str, mode: str = "unified", kind: str = "decoder", steps: int = 2, **decoder) -> object:
    d = {"source": "hf", "hf_path": lm, "instruction": "Describe this image.", "max_length": 96, **decoder}
    model = {"kind": kind, "embed_dim": 16, "image": TOWER, "text": {"context_length": 12}}
    if kind == "decoder":
        model["bridge"] = {"mode": mode, "taps": [0, -1], "xattn_every": 1, "decoder": d}
    else:
        model["blip2"] = {"decoder": d}
        model["qformer"] = {"num_queries": 4, "width": 32, "layers": 1, "heads": 2}
    return from_dict({
        "model": model,
        "data": {"synthetic": {"train_size": 64, "val_size": 16, "test_size": 16}, "num_workers": 0},
        "loss": {"lm": 1.0, "lm_label_smoothing": 0.0},
        "train": {"steps": steps, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 0, "log_every": 1,
                  "lr": 1e-3, "tensorboard": False},
    })


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build(cfg.model).eval()


CAPTIONS = ["a red circle", "two blue squares and a green triangle", "a yellow star"]


# --------------------------------------------------------------------------------------------------- the LM interface


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lm_interface_equals_the_models_own_logits(arch, lm_dirs):
    model = _model(_cfg(lm_dirs[arch]))
    hf = model.lm.hf
    ids = torch.randint(3, 250, (2, 9))
    for mask in (torch.ones(2, 9, dtype=torch.long), torch.tensor([[1] * 9, [0] * 3 + [1] * 6])):  # left padding
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            h, _ = model.lm.hidden(model.lm.embed(ids), mask)
            ours = model.lm.logits(h)
        real = mask.bool()
        torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_loss_equals_the_lms_own_loss(arch, lm_dirs):
    """Labels are not pre-shifted: our packed loss per caption equals the LM's own loss with labels=."""
    model = _model(_cfg(lm_dirs[arch], kind="caption_lm"))
    batch = model.text_tokenizer()(CAPTIONS)
    out = model(batch)
    ours = lm_loss(out.lm.logits, out.lm.targets, out.lm.rows, out.lm.num_captions, 0.0)
    per_row = []
    for b in range(len(CAPTIONS)):
        n = int(batch["attention_mask"][b].sum())
        per_row.append(model.lm.hf(input_ids=batch["input_ids"][b : b + 1, :n],
                                   labels=batch["labels"][b : b + 1, :n]).loss)
    torch.testing.assert_close(ours, torch.stack(per_row).mean(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------- prompts


def test_prompt_uses_the_chat_template_and_labels_only_the_answer(lm_dirs):
    model = _model(_cfg(lm_dirs["llama"]))
    tok = model.text_tokenizer()
    hf_tok = model.codec.tok
    N = model.num_visual_tokens
    assert N == 16  # the 4x4 patches of the 16 px tower (4 px patches), class token dropped
    batch = tok(CAPTIONS)
    for b, cap in enumerate(CAPTIONS):
        answer = batch["labels"][b][batch["labels"][b] != -100]
        assert hf_tok.decode(answer) == cap + "<|im_end|>"
        assert int(batch["visual_mask"][b].sum()) == N
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        start = batch["visual_mask"][b].long().argmax()
        text = hf_tok.decode(ids[:start]) + "<image>" + hf_tok.decode(ids[start + N :])
        ref = hf_tok.apply_chat_template([{"role": "user", "content": "<image>\nDescribe this image."},
                                          {"role": "assistant", "content": cap}], tokenize=False)
        assert ref.startswith(text.rstrip("\n"))
    prompts = tok.prompts(2)  # left-padded, ending where the answer starts; the same tokens as training's prefix
    assert hf_tok.decode(prompts["input_ids"][0]).endswith("<|im_start|>assistant\n")
    n_prompt = int((batch["labels"][0] == -100).long().cumprod(0).sum())
    assert prompts["input_ids"][0].tolist()[-n_prompt:] == batch["input_ids"][0, :n_prompt].tolist()


def test_prompt_without_template_and_errors(tmp_path):
    from transformers import AutoTokenizer

    from contrast.decoders import HFCodec, PromptTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "plain", chat=False)))
    p = PromptTokenizer(HFCodec(tok), "describe this image.", "auto", 3, "prompt", 32)
    batch = p(["a red circle"])
    ids = batch["input_ids"][0].tolist()
    assert ids[-1] == tok.eos_token_id and tok.decode(batch["labels"][0][batch["labels"][0] != -100]) == \
        " a red circle<|endoftext|>"
    with pytest.raises(PromptError, match="chat_template"):
        PromptTokenizer(HFCodec(tok), "", "always", 3)
    with pytest.raises(PromptError, match="max_length"):
        PromptTokenizer(HFCodec(tok), "describe this image.", "auto", 30, "prompt", 32)(["a red circle"])


# --------------------------------------------------------------------------------------------------- bridges


def test_unified_writes_visual_tokens_at_the_placeholders(lm_dirs):
    model = _model(_cfg(lm_dirs["qwen2"]))
    batch = {**model.text_tokenizer()(CAPTIONS), "pixels": torch.randn(3, 3, 16, 16)}
    with torch.no_grad():
        out = model(batch)
        x = model.lm.embed(batch["input_ids"]).clone()
        vis = model.visual_tokens(batch["pixels"])
        for b in range(3):
            x[b, batch["visual_mask"][b]] = vis[b]
        h, _ = model.lm.hidden(x, batch["attention_mask"])
        where = batch["labels"][:, 1:] != -100
        torch.testing.assert_close(out.lm.logits, model.lm.logits(h[:, :-1][where]))
    bad = dict(batch, visual_mask=batch["visual_mask"].clone())
    bad["visual_mask"][1, batch["visual_mask"][1].long().argmax()] = False
    with pytest.raises(ValueError, match=f"holds {model.num_visual_tokens - 1} image placeholder.*gives "
                                         f"{model.num_visual_tokens} visual tokens"):
        model(bad)


def _bare_and_xattn_logits(model) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A batch, the bare Hugging Face LM's logits on it and the cross-attention decoder's."""
    batch = {**model.text_tokenizer()(CAPTIONS), "pixels": torch.randn(3, 3, 16, 16)}
    mask = batch["attention_mask"]
    with torch.no_grad():
        bare = model.lm.hf(input_ids=batch["input_ids"], attention_mask=mask).logits
        h, _ = model.lm.hidden(model.lm.embed(batch["input_ids"]), mask,
                               model.cross_hook(model.visual_tokens(batch["pixels"]), None, batch["image_rows"]))
    return batch, bare, model.lm.logits(h).detach()


def test_xattn_on_a_real_lm_is_the_bare_lm_at_init_and_leaves_text_before_the_image(lm_dirs):
    cfg = _cfg(lm_dirs["llama"], mode="xattn", system="You look at pictures.")
    model = _model(cfg)
    assert sorted(model.xattn) == ["0", "1"] and model.num_visual_tokens == 17  # class token + 16 patches
    batch, bare, ours = _bare_and_xattn_logits(model)
    mask = batch["attention_mask"]
    assert torch.equal(ours[mask.bool()], bare[mask.bool()])
    with torch.no_grad():
        for blk in model.xattn.values():
            blk.gate_attn.fill_(1.0)
            blk.gate_mlp.fill_(1.0)
        h, _ = model.lm.hidden(model.lm.embed(batch["input_ids"]), mask,
                               model.cross_hook(model.visual_tokens(batch["pixels"]), None, batch["image_rows"]))
        opened = model.lm.logits(h)
    before = mask.bool() & ~batch["image_rows"]  # the system turn and the user turn's start: no image to read
    assert before.sum() > 5
    torch.testing.assert_close(opened[before], bare[before], atol=1e-5, rtol=1e-5)
    after = batch["image_rows"] & mask.bool()
    assert (opened[after] - bare[after]).abs().max() > 1e-3


def test_xattn_without_mlp_trains_attention_and_its_gate_only(lm_dirs):
    cfg = _cfg(lm_dirs["llama"], mode="xattn")
    cfg.model.bridge.xattn_mlp_ratio = 0.0
    model = _model(cfg)
    with_mlp = _model(_cfg(lm_dirs["llama"], mode="xattn"))
    per_block = {n.split(".", 2)[2] for n in _names(model, "xattn")}
    assert not any("mlp" in n for n in per_block) and "gate_attn" in per_block
    assert {n for n in _trainable(model) if not n.startswith("image.")} == _names(model, "bridge", "xattn")
    mlp = sum(p.numel() for n, p in with_mlp.xattn.named_parameters() if "mlp" in n)
    assert sum(p.numel() for p in with_mlp.xattn.parameters()) - sum(p.numel() for p in model.xattn.parameters()) == mlp
    batch, bare, ours = _bare_and_xattn_logits(model)
    real = batch["attention_mask"].bool()
    assert torch.equal(ours[real], bare[real])  # the bare LM at initialisation
    from contrast.train.optim import param_groups

    cfg.train.gate_lr = 3e-2
    gates = {g["name"]: g for g in param_groups(model, cfg.train)}["gate_no_decay"]["params"]
    assert {id(p) for p in gates} == {id(b.gate_attn) for b in model.xattn.values()}


@pytest.mark.parametrize("mode", ["unified", "xattn"])
def test_embedding_token_is_the_towers_projected_embedding_first(mode, lm_dirs, tmp_path):
    from contrast.export import export_timm

    cfg = _cfg(lm_dirs["llama"], mode=mode)
    plain = _model(cfg)
    cfg.model.bridge.embedding_token = True
    model = _model(cfg)
    assert model.num_visual_tokens == plain.num_visual_tokens + 1
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        got = model.visual_tokens(pixels)
        emb = model.image.proj(model.image.pool(model.image.forward_tokens(pixels)))  # the tower's image embedding
        p = model.embedding_projector
        torch.testing.assert_close(got[:, 0], p.fc2(torch.nn.functional.gelu(p.fc1(emb))))
        torch.testing.assert_close(got[:, 1:], model.bridge(model.visual_features(pixels)))
    batch = {**model.text_tokenizer()(CAPTIONS), "pixels": pixels}
    if mode == "unified":  # the prompt holds one more placeholder position
        assert batch["visual_mask"].sum(1).tolist() == [model.num_visual_tokens] * 3
    out = model(batch).lm
    assert torch.isfinite(lm_loss(out.logits, out.targets, out.rows, out.num_captions, 0.0))
    # a fresh tower now trains through its projection (read by the embedding token); a loaded one stays frozen
    assert any(n.startswith("image.proj") for n in _trainable(model))
    export_timm(plain.image, tmp_path / "tower")
    cfg.model.bridge.tower = str(tmp_path / "tower")
    loaded = _model(cfg)
    assert _trainable(loaded) == _names(loaded, "bridge", "embedding_projector") | (
        _names(loaded, "xattn") if mode == "xattn" else set())
    assert {k for k in loaded.bridge_state() if k.startswith("embedding_projector.")} == {
        "embedding_projector.fc1.weight", "embedding_projector.fc1.bias", "embedding_projector.fc2.weight",
        "embedding_projector.fc2.bias"}
    cfg.model.bridge.use_images = False  # the reference: a learned prompt of as many tokens
    assert _model(cfg).null.shape[0] == model.num_visual_tokens


@pytest.mark.parametrize("mode", ["unified", "xattn", "blip2"])
def test_every_trainable_parameter_of_a_no_image_reference_gets_a_gradient(mode, lm_dirs):
    """The reference (``use_images: false``) trains only what it reads: a parameter left trainable without a gradient
    stops DDP at its next step. A fresh tower and the embedding token would otherwise stay trainable."""
    from contrast.objectives import build_objective

    kind = "blip2_stage2" if mode == "blip2" else "decoder"
    cfg = _cfg(lm_dirs["llama"], "unified" if mode == "blip2" else mode, kind, stage="finetune", lora_rank=2)
    if kind == "decoder":
        cfg.model.bridge.use_images, cfg.model.bridge.embedding_token = False, True
    else:
        cfg.model.blip2.use_images = False
    model = _model(cfg).train()
    batch = {**model.text_tokenizer()(CAPTIONS), "pixels": torch.randn(3, 3, 16, 16)}
    build_objective(cfg.loss)(model(batch)).total.backward()
    trainable = _trainable(model)
    assert "null" in trainable and any(n.startswith("lora.") for n in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None} == set()


def test_embedding_token_with_tiles_is_refused(lm_dirs):
    cfg = _cfg(lm_dirs["llama"], mode="xattn")
    cfg.model.bridge.embedding_token = True
    cfg.model.bridge.max_num_tiles = 4
    with pytest.raises(ValueError, match="embedding_token.*max_num_tiles"):
        build(cfg.model)


def test_pixel_shuffle_projector_folds_neighbours():
    x = torch.arange(2 * 16 * 3, dtype=torch.float).view(2, 16, 3)  # a 4x4 grid of 3-d tokens
    y = pixel_shuffle(x, 2)
    assert y.shape == (2, 4, 12)
    grid = x.view(2, 4, 4, 3)
    for i in range(2):
        for j in range(2):  # output token (i, j) holds the 2x2 block at rows 2i..2i+1, columns 2j..2j+1, row-major
            block = grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 12)
            assert torch.equal(y[:, 2 * i + j], block)
    with pytest.raises(ValueError, match="does not divide the 4x4"):
        pixel_shuffle(x, 3)
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.zeros(1, 15, 3), 2)


def test_cls_patch_drops_register_tokens():
    from contrast.config import ImageTowerConfig
    from contrast.towers import ImageTower

    tower = ImageTower(ImageTowerConfig(name="vit_tiny_patch16_224", image_size=16,
                                        kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                "num_heads": 2, "reg_tokens": 3}), 16).eval()
    assert tower.num_prefix_tokens == 4 and tower.num_register_tokens == 3
    bridge = UnifiedBridge(tower.width, tower.num_prefix_tokens, 24, tokens="cls_patch",
                           num_registers=tower.num_register_tokens)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        full = tower.forward_intermediates(x, [-2])[0]  # (2, 4 + 4, 32)
        feats = bridge.features(tower, x)
    assert feats.shape == (2, 5, 32)
    assert torch.equal(feats[:, 0], full[:, 0]) and torch.equal(feats[:, 1:], full[:, 4:])


# --------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("source,mode", [("own", "unified"), ("hf", "unified"), ("hf", "xattn"), ("hf", "blip2")])
def test_cached_generation_equals_uncached(source, mode, tmp_path):
    folder = tiny_hf_folder(tmp_path / "lm", "qwen2", seed=3) if source == "hf" else None  # an untied head
    kind = "blip2_stage2" if mode == "blip2" else "decoder"
    cfg = _cfg(str(folder), mode if mode != "blip2" else "unified", kind)
    d = cfg.model.bridge.decoder if kind == "decoder" else cfg.model.blip2.decoder
    if source == "own":
        d.source, d.hf_path, d.width, d.layers, d.heads, d.max_positions = "own", None, 32, 2, 2, 64
    model = _model(cfg, seed=1)
    with torch.no_grad():  # a random LM repeats one token; larger weights make its answers move
        for p in model.parameters():
            p.mul_(4.0 if p.ndim >= 2 else 1.0)
        if mode == "xattn":
            for blk in model.xattn.values():
                blk.gate_attn.fill_(1.0)
    batch = prompt_batch(model.text_tokenizer(), torch.randn(3, 3, 16, 16))
    cached = [ids for ids, _ in greedy(model, batch, 12)]
    assert cached == greedy_uncached(model, batch, 12)
    assert len({tuple(c) for c in cached}) > 1 or len(set(cached[0])) > 1  # not one repeated token everywhere
    assert [ids for ids, _ in beam_search(model, batch, 1, 12)] == cached  # one beam is greedy decoding
    eos = set(model.eos_token_ids)
    for b, (ids, score) in enumerate(beam_search(model, batch, 3, 12)):  # its score is its tokens' log-probability
        row = {k: v[b : b + 1] for k, v in batch.items()}
        total = 0.0
        for t in ids:
            logits, _ = model.prefill(row)
            total += float(torch.log_softmax(logits, -1)[0, t])
            row = _append(row, t)
        assert abs(total - score) < 1e-3 and (ids[-1] in eos or len(ids) == 12)


def _append(row: dict, t: int) -> dict:
    one = torch.ones(1, 1, dtype=torch.long)
    return {**row, "input_ids": torch.cat([row["input_ids"], one * t], 1),
            "attention_mask": torch.cat([row["attention_mask"], one], 1),
            "visual_mask": torch.cat([row["visual_mask"], torch.zeros(1, 1, dtype=torch.bool)], 1),
            "image_rows": torch.cat([row["image_rows"], torch.ones(1, 1, dtype=torch.bool)], 1)}


# --------------------------------------------------------------------------------------------------- stages


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _names(model, *parts) -> set[str]:
    return {f"{m}.{n}" for m in parts for n, _ in getattr(model, m).named_parameters()}


def test_stage_presets_choose_what_trains(lm_dirs, tmp_path):
    from contrast.export import export_timm

    export_timm(_model(_cfg(lm_dirs["llama"])).image, tmp_path / "tower")  # a tower read from elsewhere stays frozen
    align = _model(_cfg(lm_dirs["llama"]))
    tower = _trainable(align) - _names(align, "bridge")  # a fresh tower trains, up to the block the bridge reads
    assert align.stage == "align" and tower and tower < _names(align, "image")
    assert not {n for n in tower if n.startswith(("image.proj", "image.backbone.norm.", "image.backbone.blocks.1."))}
    cfg = _cfg(lm_dirs["llama"])
    cfg.model.bridge.embedding_token = True  # the embedding token reads the whole tower, up to its projection
    assert {n for n in _trainable(_model(cfg)) if n.startswith("image.")} == _names(align, "image")
    cfg = _cfg(lm_dirs["llama"])
    cfg.model.bridge.tower = str(tmp_path / "tower")
    assert _trainable(_model(cfg)) == _names(align, "bridge")
    cfg.model.bridge.decoder.stage = "finetune"
    fine = _model(cfg)
    assert _trainable(fine) == _names(fine, "lm", "bridge")
    cfg.model.bridge.mode = "xattn"
    cfg.model.bridge.decoder.stage = "align"
    ref = _model(cfg)
    assert _trainable(ref) == _names(ref, "bridge", "xattn")
    cfg.model.bridge.use_images = False
    assert _trainable(_model(cfg)) == {"null"} | _names(ref, "xattn")  # the reference reads no image
    from contrast.train.optim import param_groups

    cfg = _cfg(lm_dirs["llama"], stage="finetune")
    cfg.train.lm_lr = 2e-5
    groups = {g["name"]: g["lr"] for g in param_groups(fine, cfg.train)}
    assert groups["lm"] == 2e-5 and groups["head"] == cfg.train.lr
    cfg.train.gate_lr = 3e-2  # cross-attention gates: a group of their own
    by_name = {g["name"]: g for g in param_groups(ref, cfg.train)}
    gates = {id(p) for n, p in ref.named_parameters() if n.endswith(("gate_attn", "gate_mlp"))}
    assert len(gates) == 2 * len(ref.xattn) and {id(p) for p in by_name["gate_no_decay"]["params"]} == gates
    assert by_name["gate_no_decay"]["lr"] == 3e-2 and by_name["gate_no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == cfg.train.lr for n, g in by_name.items() if n != "gate_no_decay")
    with pytest.raises(ConfigError, match="train.gate_lr is set but this model trains no cross-attention gates"):
        param_groups(fine, cfg.train)  # the unified bridge has none


def test_align_run_keeps_the_lm_bit_identical_and_saves_only_the_bridge(lm_dirs, tmp_path):
    cfg = _cfg(lm_dirs["gpt2"], steps=3)
    result = train(cfg, tmp_path / "run", progress=False)
    saved = read_weights(resolve(result.run_dir) / "model.safetensors")
    assert {k.split(".")[0] for k in saved} == {"bridge", "image"}  # what trained; the frozen LM is read from its folder
    model, _, tok = load(result.run_dir)
    fresh = _model(cfg)
    for name, p in model.lm.state_dict().items():
        assert torch.equal(p, fresh.lm.state_dict()[name])  # the LM read back from its folder, untouched
    assert any(not torch.equal(p, fresh.bridge.state_dict()[n]) for n, p in model.bridge.state_dict().items())
    assert tok(["a red circle"])["visual_mask"].sum() == model.num_visual_tokens
    # a finetune stage starts from the align run's bridge by its path
    nxt = _cfg(lm_dirs["gpt2"], steps=1, stage="finetune", previous_stage=str(result.run_dir))
    started = build(nxt.model)
    for n, p in model.bridge.state_dict().items():
        assert torch.equal(started.bridge.state_dict()[n], p)
    wrong = _cfg(lm_dirs["gpt2"], mode="xattn", previous_stage=str(result.run_dir))
    with pytest.raises(ValueError, match="does not fit this model"):
        build(wrong.model)


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("mlp_ratio", [4.0, 0.0])
def test_resumed_decoder_run_equals_uninterrupted(mlp_ratio, lm_dirs, tmp_path, monkeypatch):
    cfg = _cfg(lm_dirs["llama"], mode="xattn", steps=4, stage="finetune")
    cfg.model.bridge.xattn_mlp_ratio = mlp_ratio  # 0: cross-attention blocks without their gated MLPs
    cfg.train.micro_batch_size, cfg.train.accumulate = 2, "mean"  # exact for per-caption losses of equal batches
    cfg.model.bridge.embedding_token, cfg.train.gate_lr = True, 5e-2  # the optimizer's gate group resumes too
    full = train(cfg, tmp_path / "full", progress=False)
    cfg.train.checkpoint_every = 2
    with monkeypatch.context() as m:
        stop_after_first_checkpoint(m)
        with pytest.raises(StoppedAfterCheckpoint):
            train(cfg, tmp_path / "part", progress=False)
    train(cfg, tmp_path / "part", resume="latest", progress=False)
    a, b = _losses(full.run_dir), _losses(tmp_path / "part")
    assert [s for s, _ in a] == [1, 2, 3, 4] == [s for s, _ in b]
    assert [x for _, x in a] == [y for _, y in b]


# --------------------------------------------------------------------------------------------------- CLI and errors


def test_generate_and_caption_eval_commands(lm_dirs, tmp_path, capsys):
    from PIL import Image

    cfg = _cfg(lm_dirs["llama"], steps=1)
    run = train(cfg, tmp_path / "run", progress=False).run_dir
    for i in range(2):
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--checkpoint", str(run),
                 "--max-new-tokens", "4", "--json", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["image"] for x in lines] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    assert main(["eval", "caption", "--checkpoint", str(run), "--split", "val", "--limit", "8", "--no-images",
                 "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["with_images"]["captions"] == 8 and out["images_off"]["tokens"] == out["with_images"]["tokens"]
    assert out["with_images"]["nats_per_token"] != out["images_off"]["nats_per_token"]


def test_bad_decoder_inputs_are_one_line_errors(tmp_path, capsys):
    from contrast.errors import UserError

    cfg = _cfg("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(UserError, match="hub name"):
        build(cfg.model)
    cfg = _cfg(str(tmp_path))
    cfg.model.bridge.decoder.hf_path = None
    cfg.model.bridge.decoder.hf_config = hf_config("llama")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        build(cfg.model)
    (tmp_path / "r.yaml").write_text("model: {kind: decoder, bridge: {decoder: {source: hf, hf_path: /nonexistent}}}\n")
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "contrast: error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------- tiled images


def test_tiled_cross_attention_reads_real_tiles_only(lm_dirs, tmp_path):
    from PIL import Image

    from contrast.data.collate import stack_images
    from contrast.data.transforms import model_transform

    cfg = _cfg(lm_dirs["llama"], mode="xattn", steps=2)
    cfg.model.bridge.max_num_tiles = 4
    model = _model(cfg)
    tf = model_transform(cfg.model)
    images = [Image.new("RGB", size, colour) for size, colour in (((64, 16), (250, 0, 0)), ((16, 16), (0, 250, 0)),
                                                                   ((20, 40), (0, 0, 250)))]
    batch = {**model.text_tokenizer()(CAPTIONS), **stack_images([tf(im) for im in images])}
    assert batch["pixels"].shape == (3, 4, 3, 16, 16)
    assert batch["tile_mask"].sum(1).tolist() == [4, 1, 2]  # a 1x4 strip, one tile, a 2x1 column
    with torch.no_grad():
        for blk in model.xattn.values():
            blk.gate_attn.fill_(1.0)
            blk.gate_mlp.fill_(1.0)
        model.tile_embed.weight.normal_()
        out = model(batch).lm.logits
        noisy = dict(batch, pixels=batch["pixels"].clone())
        noisy["pixels"][~batch["tile_mask"]] = torch.randn_like(noisy["pixels"][~batch["tile_mask"]])
        torch.testing.assert_close(model(noisy).lm.logits, out)  # padded tiles are never read
        other = dict(batch, aspect_ratio_ids=batch["aspect_ratio_ids"].flip(0))
        assert not torch.allclose(model(other).lm.logits, out)  # the tiles' places in their grid matter
    cached = [ids for ids, _ in greedy(model, prompt_batch(model.text_tokenizer(), {k: batch[k] for k in (
        "pixels", "tile_mask", "aspect_ratio_ids")}), 6)]
    assert cached == greedy_uncached(model, prompt_batch(model.text_tokenizer(), {k: batch[k] for k in (
        "pixels", "tile_mask", "aspect_ratio_ids")}), 6)
    run = train(cfg, tmp_path / "tiled", progress=False)  # the training data path tiles the built-in images
    assert run.step == 2 and load(run.run_dir)[1](images[0])["pixels"].shape == (4, 3, 16, 16)
    cfg.model.bridge.mode = "unified"
    with pytest.raises(ValueError, match="cross-attention bridge"):
        build(cfg.model)


def test_lora_adapters_start_as_the_bare_lm_and_train_alone(lm_dirs, tmp_path):
    from contrast.decoders.lora import merged_weight

    cfg = _cfg(lm_dirs["qwen2"], steps=3, stage="finetune", lora_rank=4)
    model = _model(cfg)
    assert _trainable(model) - _names(model, "image") == _names(model, "bridge", "lora") and len(model.lora) == 4
    ids = torch.randint(3, 250, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.lm.logits(model.lm.hidden(model.lm.embed(ids))[0]),
                                   model.lm.hf(input_ids=ids).logits, rtol=0, atol=0)  # B = 0: the bare LM
    result = train(cfg, tmp_path / "lora", progress=False)
    saved = read_weights(resolve(result.run_dir) / "model.safetensors")
    assert {k.split(".")[0] for k in saved} == {"bridge", "image", "lora"}  # the LM is read from its folder
    trained, _, _ = load(result.run_dir)
    fresh = _model(cfg)
    for name, p in trained.lm.state_dict().items():
        assert torch.equal(p, fresh.lm.state_dict()[name])
    key, adapter = next(iter(trained.lora.items()))
    assert adapter.B.abs().max() > 0  # the adapters moved
    layer = trained.lm.get_submodule(key.replace("__", "."))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():  # the merged weight computes what the hooked layer computes
        torch.testing.assert_close(layer(x), x @ merged_weight(layer, adapter).t() + layer.bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="finetune stage"):
        build(_cfg(lm_dirs["qwen2"], stage="align", lora_rank=4).model)
    with pytest.raises(ValueError, match="no linear layer"):
        build(_cfg(lm_dirs["gpt2"], stage="finetune", lora_rank=4).model)  # GPT-2's projections are Conv1D


SMOLLM2 = Path("~/.cache/contrast/lm/smollm2-135m-instruct").expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="contrast data fetch lm smollm2-135m-instruct has not been run")
def test_one_align_step_on_smollm2(tmp_path):
    from contrast.config import load_recipe

    cfg = load_recipe(str(Path(__file__).parents[1] / "recipes/vlm_unified_emoji.yaml"), [
        "model.bridge.tower=null", "data.source=synthetic", "data.synthetic.train_size=64", "data.num_workers=0",
        "train.steps=1", "train.batch_size=2", "train.checkpoint_every=0", "train.tensorboard=false",
        f"model.bridge.decoder.hf_path={SMOLLM2}"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 1 and math.isfinite(result.last_loss)
    model, _, tok = load(result.run_dir)
    batch = tok(["red circle"])
    assert model.codec.tok.decode(batch["labels"][0][batch["labels"][0] != -100]) == "red circle<|im_end|>"
    assert int(batch["visual_mask"].sum()) == model.num_visual_tokens == 10  # the image embedding + 3x3 patches


def test_a_decoder_runs_tower_embeds_through_its_clip_run(lm_dirs, tmp_path, data_cache):
    from conftest import tiny_config

    from contrast.runs import load_model, tower_embedder

    clip_run = train(tiny_config(data_cache, steps=2), tmp_path / "clip", progress=False).run_dir
    cfg = _cfg(lm_dirs["llama"], steps=1)
    cfg.model.image = load_model(clip_run).image_tower.cfg
    cfg.model.bridge.tower, cfg.model.bridge.layer = str(clip_run), -1  # the tiny tower has one block
    run = train(cfg, tmp_path / "vlm", progress=False).run_dir
    decoder, _, _ = load(run)
    clip, _, clip_tok = load(clip_run)
    embedder, tok = tower_embedder(cfg, decoder)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the frozen tower is the CLIP run's: the same embeddings as that run
        torch.testing.assert_close(embedder.encode_image(x), clip.encode_image(x))
        ids = tok(["a red circle"])
        torch.testing.assert_close(embedder.encode_text(ids), clip.encode_text(clip_tok(["a red circle"])))
    with pytest.raises(ValueError, match="embeds no text"):
        tower_embedder(_cfg(lm_dirs["llama"]), decoder)


@pytest.mark.parametrize("mode", ["unified", "xattn"])
def test_caption_loss_is_evaluated_during_training_and_keeps_the_best(mode, lm_dirs, tmp_path, capsys):
    cfg = _cfg(lm_dirs["llama"], mode=mode, steps=4)
    cfg.model.bridge.embedding_token = True  # evaluation reads the visual input the training step reads
    cfg.model.bridge.xattn_mlp_ratio = 0.0 if mode == "xattn" else 4.0
    cfg.train.lr, cfg.train.eval_every, cfg.train.best_metric = 3e-3, 2, "caption/nats_per_token"
    cfg.eval.caption_split, cfg.eval.caption_limit, cfg.eval.batch_size = "val", 8, 4
    result = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval"]["caption/nats_per_token"] for r in rows if "eval" in r}
    assert sorted(evals) == [2, 4]
    best_step = min(evals, key=evals.get)  # a loss: the lowest is kept
    assert resolve(result.run_dir / "checkpoints" / "best").name == f"step_{best_step:08d}"
    capsys.readouterr()
    assert main(["eval", "caption", "--checkpoint", str(result.run_dir / "checkpoints" / "best"), "--split", "val",
                 "--limit", "8", "--batch-size", "4", "--json", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])["with_images"]["nats_per_token"]
    assert abs(again - evals[best_step]) < 1e-5
    cfg.eval.caption_split, cfg.eval.tasks = None, ["eval/tasks/shapes.yaml"]
    with pytest.raises(ValueError, match="contrast eval zeroshot --checkpoint RUN"):
        train(cfg, tmp_path / "other", progress=False)


def _fsdp_worker(rank: int, init_file: str, result_file: str, tok_dir: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from contrast import distributed
    from contrast.objectives import Comm, build_objective
    from contrast.train.fsdp import shard_model
    from contrast.train.optim import build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for mode, lora in (("ddp", 0), ("fsdp", 0), ("ddp_lora", 4), ("fsdp_lora", 4)):
        cfg = _cfg(None, mode="xattn", stage="finetune", lora_rank=lora)
        cfg.model.bridge.embedding_token, cfg.train.gate_lr = True, 5e-2  # both reach FSDP's units and groups
        d = cfg.model.bridge.decoder
        d.hf_path, d.hf_config, d.tokenizer = None, hf_config("qwen2"), tok_dir
        torch.manual_seed(0)
        model = build(cfg.model)
        comm = Comm(distributed.gather_with_grad, rank, 2, distributed.ring_shift)
        sharded = mode.startswith("fsdp")
        net = shard_model(model, torch.device("cpu")) if sharded else nn.parallel.DistributedDataParallel(model)
        objective, opt = build_objective(cfg.loss, comm), build_optimizer(model, cfg.train)
        g = torch.Generator().manual_seed(rank)
        losses = []
        for step in range(2):
            batch = {**model.text_tokenizer()(CAPTIONS[rank + step :] + CAPTIONS[: rank + step]),
                     "pixels": torch.randn(3, 3, 16, 16, generator=g)}
            loss = objective(net(batch)).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(distributed.all_reduce_mean(loss.detach())))
        results[mode] = losses
    if rank == 0:
        torch.save(results, result_file)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_decoder_steps_equal_ddp_steps(tmp_path):
    """A Hugging Face LM with gated cross-attention before its layers (the image embedding as a context token, the
    gates at their own learning rate), finetuned (the whole LM, or LoRA adapters on it): its decoder layers become FSDP
    units with the cross-attention and adapter hooks still on them; two steps under FSDP equal two under DDP."""
    import os

    import torch.multiprocessing as mp

    tok = str(make_tokenizer(tmp_path / "tok"))
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path / "r.pt"), tok), nprocs=2, join=True)
    r = torch.load(tmp_path / "r.pt", weights_only=True)
    assert r["fsdp"] == pytest.approx(r["ddp"], rel=1e-5) and r["ddp"][0] != r["ddp"][1]
    assert r["fsdp_lora"] == pytest.approx(r["ddp_lora"], rel=1e-5) and r["ddp_lora"][0] != r["ddp_lora"][1]
    assert r["ddp_lora"][1] != pytest.approx(r["ddp"][1], rel=1e-6)  # the adapters, not the whole LM, trained


@pytest.mark.parametrize("mode", ["unified", "xattn"])
def test_checkpointed_and_bf16_steps_match_the_plain_one(mode, lm_dirs):
    """Activation checkpointing gives the plain step's loss and gradients (the cross-attention hook runs outside the
    layers' checkpoints); a bf16 autocast forward stays within bf16's precision of the fp32 loss."""
    from contrast.objectives import build_objective

    cfg = _cfg(lm_dirs["llama"], mode=mode, stage="finetune")
    batch = {**_model(cfg).text_tokenizer()(CAPTIONS), "pixels": torch.randn(3, 3, 16, 16)}
    grads, losses = [], []
    for checkpointing in (False, True):
        model = _model(cfg).train()
        model.set_grad_checkpointing(checkpointing)
        loss = build_objective(cfg.loss)(model(batch)).total
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0])
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("lm.") for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        low = build_objective(cfg.loss)(_model(cfg).train()(batch)).total
    assert abs(float(low) - float(losses[0])) < 0.02 * float(losses[0])


def test_plan_measures_a_decoder_recipe_with_its_own_prompts(lm_dirs):
    from contrast.plan import measure

    cfg = _cfg(lm_dirs["llama"])
    m = measure(cfg)
    lm_params = sum(p.numel() for p in _model(cfg).lm.parameters())
    assert m.params["lm"] == {"total": lm_params, "trainable": 0}  # align: the LM is frozen
    assert m.params["head"]["trainable"] > 0 and m.flops_step.per_sample > 0


def test_a_decoder_trained_from_shards_evaluates_its_caption_loss_on_the_val_shards(lm_dirs, tmp_path, capsys):
    from contrast.data.shard import write_shards

    cfg = _cfg(lm_dirs["llama"], steps=2)
    for split in ("train", "val"):
        write_shards(cfg.data, tmp_path / "shards" / split, split=split, shard_size=8, image_size=16)
    cfg.data.source = str(tmp_path / "shards")
    cfg.eval.caption_split, cfg.eval.caption_limit, cfg.eval.batch_size = "val", 8, 4
    result = train(cfg, tmp_path / "run", progress=False)
    streamed = result.metrics["caption/nats_per_token"]
    capsys.readouterr()  # the same checkpoint on the table the shards were written from: the same first 8 rows
    assert main(["eval", "caption", "--checkpoint", str(result.run_dir), "--data", "synthetic", "--split", "val",
                 "--limit", "8", "--batch-size", "4", "--json", "--device", "cpu"]) == 0
    table = json.loads(capsys.readouterr().out.splitlines()[-1])["with_images"]["nats_per_token"]
    assert abs(streamed - table) < 1e-5


@pytest.mark.parametrize("fsdp,use_images", [(True, True), (False, False)])
def test_torchrun_fsdp_decoder_run_with_evaluation_equals_one_process(fsdp, use_images, lm_dirs, tmp_path, data_cache):
    """``torchrun --nproc_per_node 2`` (gloo) with FSDP of a cross-attention decoder on a Hugging Face LM (finetune
    stage, the image embedding token, a gate learning rate) and the caption loss evaluated during training: the
    per-step losses and the evaluations equal one process training on the global batch without FSDP. The same for
    the no-image reference under DDP, which stops at any trainable parameter that gets no gradient."""
    import yaml
    from test_distributed import PER_RANK, WORLD, _torchrun

    from contrast.config import load_recipe

    recipe = tmp_path / "vlm_fsdp.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"kind": "decoder", "embed_dim": 16, "image": TOWER,
                  "bridge": {"mode": "xattn", "taps": [0, -1], "xattn_every": 1, "embedding_token": True,
                             "use_images": use_images,
                             "decoder": {"source": "hf", "hf_path": lm_dirs["qwen2"], "instruction": "Describe this image.",
                                         "max_length": 96, "stage": "finetune"}}},
        "data": {"source": "synthetic", "cache_dir": data_cache,
                 "synthetic": {"image_size": 16, "train_size": 64, "val_size": 8, "test_size": 8}},
        "loss": {"lm": 1.0, "lm_label_smoothing": 0.0},
        "eval": {"caption_split": "val", "caption_limit": 8, "batch_size": 4},
        "train": {"steps": 3, "batch_size": PER_RANK, "lr": 1e-3, "gate_lr": 5e-2, "warmup_steps": 1,
                  "min_lr_ratio": 1.0, "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "threads": 1,
                  "device": "cpu", "tensorboard": False},
    }))
    _torchrun(recipe, tmp_path / "fsdp", "--set", f"train.fsdp={str(fsdp).lower()}")
    single = tmp_path / "single"
    train(load_recipe(recipe, [f"train.batch_size={WORLD * PER_RANK}"]), single, progress=False)

    def rows(run, key):  # one row per step and key: rank 0 alone writes
        got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        got = [(r["step"], r[key] if key == "loss" else r[key]["caption/nats_per_token"]) for r in got if key in r]
        assert len({s for s, _ in got}) == len(got), f"{key} written more than once per step: {got}"
        return dict(got)

    for key, steps in (("loss", [1, 2, 3]), ("eval", [2, 3])):
        two, one = rows(tmp_path / "fsdp", key), rows(single, key)
        assert sorted(two) == sorted(one) == steps
        for step in two:
            assert two[step] == pytest.approx(one[step], rel=1e-4), f"{key} at step {step}: 2 processes {two[step]}, 1 {one[step]}"
