"""One contract over every tower: timm image towers with learned, sin-cos and rotary positions and a CNN; the CLIP
text tower; a Hugging Face text tower on a tiny BERT written here.

Every number is checked against an independent reference: timm's own forward for pooling, the tokenizer's own
end-of-text position and attention mask, hand-computed position tables, and a plain (not checkpointed) run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrast.config import ImageTowerConfig, TextTowerConfig
from contrast.objectives import info_nce
from contrast.tokenizer import ClipTokenizer
from contrast.towers import ImageTower, TextTower, Tower

E = 16  # projection width of every tower here
CTX = 16  # context length of the CLIP text towers
SENTENCES = ["a red square", "two blue circles on a green mat", "hi"]


@dataclass(frozen=True)
class Case:
    name: str
    last_group: tuple[str, ...]  # parameter-name prefixes of the last lock group
    first_block: str  # a module inside the first checkpointed block (runs again in backward when checkpointed)
    blocks: int  # outputs forward_intermediates can tap
    to_tokens: str | None  # the module taking the last tap to forward_tokens' output ("": none; None: no such map)
    image: tuple[str, int, dict] | None = None  # timm name, image_size, kwargs
    tokens: int = 0  # N of forward_tokens for image towers
    pos_embed: str = "default"  # model.image.pos_embed


CASES = [
    # (a) learned absolute positions
    Case("vit_learned", ("backbone.blocks.1.", "backbone.norm."), "backbone.blocks.0", 2, "backbone.norm",
         ("vit_tiny_patch16_224", 32, dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)), tokens=17),
    # (b) a ViT whose absolute table is a fixed 2-D sin-cos table (model.image.pos_embed: sincos, MAE-style)
    Case("vit_sincos", ("backbone.blocks.1.", "backbone.norm."), "backbone.blocks.0", 2, "backbone.norm",
         ("vit_tiny_patch16_224", 32, dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)), tokens=17,
         pos_embed="sincos"),
    # (b') XCiT: fixed 2-D sin-cos (Fourier) positions through a learned 1x1 projection; BatchNorm in its stem.
    # Its class token joins only after the blocks (class-attention layers), so taps are patch tokens only.
    Case("xcit_sincos", ("backbone.cls_attn_blocks.0.", "backbone.norm."), "backbone.blocks.0", 2, None,
         ("xcit_nano_12_p8_224", 32, dict(embed_dim=32, depth=2, num_heads=2, cls_attn_layers=1)), tokens=17),
    # (c) EVA-02: 2-D rotary positions only (the learned absolute table switched off)
    Case("eva02_rope", ("backbone.fc_norm.",), "backbone.blocks.0", 2, "",
         ("eva02_tiny_patch14_224", 28, dict(patch_size=7, embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=False)),
         tokens=17),
    # (d) a CNN: 5 feature stages, a 1x1 map at 32 px
    Case("resnet10t", ("backbone.layer4.",), "backbone.layer1.0", 5, "", ("resnet10t", 32, {}), tokens=1),
    Case("clip_text", ("transformer.blocks.1.", "ln_final."), "transformer.blocks.0", 2, "ln_final"),
    Case("hf_bert", ("encoder.encoder.layer.1.",), "encoder.encoder.layer.0.attention", 2, ""),
]
IMAGE_CASES = [c for c in CASES if c.image is not None]


def _ids(cases):
    return [c.name for c in cases]


def _case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


# --------------------------------------------------------------------------------------------------- building


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT and a WordPiece tokenizer over a hand-written vocabulary, saved like a hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w for s in SENTENCES for w in s.split()} | {"photo", "of", "the"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, pad_token_id=0)
    BertModel(cfg).save_pretrained(str(d))
    return d


def _hf_cfg(bert_dir: Path, **kw) -> TextTowerConfig:
    return TextTowerConfig(kind="hf", hf_path=str(bert_dir), context_length=CTX, **kw)


def _image_cfg(case: Case, **kw) -> ImageTowerConfig:
    name, size, kwargs = case.image
    return ImageTowerConfig(name=name, image_size=size, kwargs=dict(kwargs), pos_embed=case.pos_embed, **kw)


def build(case: Case, bert_dir: Path, **kw) -> tuple[nn.Module, torch.Tensor]:
    """A fresh tower of ``case`` and an input batch for it."""
    torch.manual_seed(0)
    if case.image is not None:
        size = case.image[1]
        return ImageTower(_image_cfg(case, **kw), E), torch.randn(3, 3, size, size)
    if case.name == "clip_text":
        cfg = TextTowerConfig(context_length=CTX, width=32, layers=2, heads=2, **kw)
        return TextTower(cfg, E), ClipTokenizer(CTX)(SENTENCES)
    from contrast.tokenizer import build_hf_tokenizer
    from contrast.towers.hf_text import HFTextTower

    cfg = _hf_cfg(bert_dir, **kw)
    return HFTextTower(cfg, E), build_hf_tokenizer(cfg)(SENTENCES)


def _trainable(tower: nn.Module) -> set[str]:
    return {n for n, p in tower.named_parameters() if p.requires_grad}


def _no_dropout(tower: nn.Module) -> None:
    for m in tower.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


# --------------------------------------------------------------------------------------------------- references


def _reference_mask_and_pool(case: Case, tower, x: torch.Tensor, tokens: torch.Tensor, bert_dir: Path):
    """(mask, pooled) computed without the tower's pooling code."""
    if case.image is not None:
        return None, tower.backbone(x)  # timm's own forward: pooled pre-logits (num_classes=0)
    if case.name == "clip_text":
        tok = ClipTokenizer(CTX)
        eot = [row.tolist().index(tok.eot_token_id) for row in x]
        mask = torch.stack([torch.arange(x.shape[1]) <= e for e in eot])
        return mask, torch.stack([tokens[i, e] for i, e in enumerate(eot)])
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(bert_dir))(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(ref["input_ids"], x)
    mask = ref["attention_mask"].bool()
    return mask, torch.stack([tokens[i, : int(m.sum())].mean(dim=0) for i, m in enumerate(mask)])


# --------------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_shapes_and_pooling_match_references(case, bert_dir):
    tower, x = build(case, bert_dir)
    tower.eval()
    assert isinstance(tower, Tower)
    B = x.shape[0]
    with torch.no_grad():
        tokens = tower.forward_tokens(x)
        mask = tower.token_mask(x)
        pooled = tower.pool(tokens, mask)
        emb = tower.embed(x)
        ref_mask, ref_pooled = _reference_mask_and_pool(case, tower, x, tokens, bert_dir)
    N = case.tokens if case.image is not None else x.shape[1]
    assert tokens.shape == (B, N, tower.width) and pooled.shape == (B, tower.width) and emb.shape == (B, E)
    assert tower.embed_dim == E
    if ref_mask is None:
        assert mask is None
    else:
        assert mask.dtype == torch.bool and torch.equal(mask, ref_mask)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb, ref_pooled @ tower.proj.weight.t(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(tower.pooled(x), ref_pooled, atol=1e-5, rtol=1e-5)  # before the projection


def test_pool_without_a_mask(bert_dir):
    tokens = torch.randn(2, 5, 32)
    text, _ = build(_case("clip_text"), bert_dir)
    torch.testing.assert_close(text.pool(tokens), tokens[:, 4], rtol=0, atol=0)  # the last position
    hf, _ = build(_case("hf_bert"), bert_dir)
    torch.testing.assert_close(hf.pool(tokens), tokens.sum(dim=1) / 5)  # the mean of all tokens


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_lock_leaves_the_last_groups_and_the_projection(case, bert_dir):
    tower, x = build(case, bert_dir)
    tower.lock(0)
    assert _trainable(tower) == {"proj.weight"}
    tower.lock(1)
    last = {n for n, _ in tower.named_parameters() if n.startswith(case.last_group)}
    assert last and _trainable(tower) == last | {"proj.weight"}
    for bad in (-1, 10_000):
        with pytest.raises(ValueError, match=r"unlocked_groups must be between 0 and \d+"):
            tower.lock(bad)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_locked_tower_is_a_fixed_function_in_train_mode(case, bert_dir):
    """Frozen batch norms keep their statistics and frozen layers have no dropout, so train() changes nothing."""
    tower, x = build(case, bert_dir)
    tower.lock(0)
    buffers = {k: v.clone() for k, v in tower.state_dict().items()}
    tower.train()
    with torch.no_grad():
        a, b = tower.embed(x), tower.embed(x)
        c = tower.eval().embed(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in buffers.items())  # running means / vars included


def test_unlocked_batch_norms_train_and_frozen_ones_do_not(bert_dir):
    case = _case("resnet10t")
    tower, x = build(case, bert_dir)
    tower.lock(1)
    tower.train()
    stem_mean = tower.backbone.bn1.running_mean.clone()
    last_mean = tower.backbone.layer4[0].bn1.running_mean.clone()
    tower.embed(x)
    assert torch.equal(tower.backbone.bn1.running_mean, stem_mean)  # frozen stem
    assert not torch.equal(tower.backbone.layer4[0].bn1.running_mean, last_mean)  # the unlocked group learns
    tower.lock(0, freeze_norm_stats=False)  # frozen weights, but statistics follow the data
    tower.train()
    tower.embed(x)
    assert not torch.equal(tower.backbone.bn1.running_mean, stem_mean)


def test_hf_dropout_stays_on_when_norm_stats_are_not_frozen(bert_dir):
    tower, ids = build(_case("hf_bert"), bert_dir)
    tower.lock(0, freeze_norm_stats=False)
    tower.train()
    assert tower.encoder.encoder.layer[0].training
    with torch.no_grad():
        assert not torch.equal(tower.embed(ids), tower.embed(ids))  # dropout p=0.1 in the tiny BERT


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_forward_intermediates_indices(case, bert_dir):
    tower, x = build(case, bert_dir)
    tower.eval()
    n = case.blocks
    with torch.no_grad():
        every = tower.forward_intermediates(x, list(range(n)))
        negative = tower.forward_intermediates(x, list(range(-n, 0)))
        last_two = tower.forward_intermediates(x, 2)
        mixed = tower.forward_intermediates(x, [-1, 0])
        tokens = tower.forward_tokens(x)
    assert len(every) == n and all(t.ndim == 3 and t.shape[0] == x.shape[0] for t in every)
    assert all(torch.equal(a, b) for a, b in zip(every, negative, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(every[-2:], last_two, strict=True))
    assert len(mixed) == 2 and torch.equal(mixed[0], every[0]) and torch.equal(mixed[1], every[-1])  # block order
    if case.to_tokens is not None:
        post = tower.get_submodule(case.to_tokens) if case.to_tokens else nn.Identity()
        with torch.no_grad():
            torch.testing.assert_close(post(every[-1]), tokens, atol=1e-5, rtol=1e-5)
    for bad in ([n], [-n - 1], n + 1, 0):
        with pytest.raises(ValueError, match="out of range"):
            tower.forward_intermediates(x, bad)
    if case.image is not None:  # one pass for taps and the final tokens: both as the separate calls give them
        with torch.no_grad():
            taps, final = tower.forward_intermediates(x, [-1, 0], final=True)
        assert all(torch.equal(a, b) for a, b in zip(taps, mixed, strict=True))
        torch.testing.assert_close(final, tokens, atol=1e-6, rtol=1e-6)


def _run(tower: nn.Module, x: torch.Tensor, weight: torch.Tensor, block: str) -> tuple[torch.Tensor, dict, int]:
    calls = []
    handle = tower.get_submodule(block).register_forward_pre_hook(lambda *_: calls.append(1))
    out = tower.embed(x)
    (out * weight).sum().backward()
    handle.remove()
    return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_grad_checkpointing_equals_plain(case, bert_dir):
    plain, x = build(case, bert_dir)
    _no_dropout(plain)
    plain.train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    weight = torch.randn(x.shape[0], E, generator=torch.Generator().manual_seed(1))
    out_p, grads_p, calls_p = _run(plain, x, weight, case.first_block)
    out_c, grads_c, calls_c = _run(ckpt, x, weight, case.first_block)
    assert (calls_p, calls_c) == (1, 2)  # the checkpointed block ran again in backward
    torch.testing.assert_close(out_c, out_p, atol=1e-6, rtol=1e-6)
    assert grads_c.keys() == grads_p.keys() and "proj.weight" in grads_p
    for k in grads_p:
        torch.testing.assert_close(grads_c[k], grads_p[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("vit_learned", "resnet10t", "hf_bert")],
                         ids=lambda c: c.name)
def test_feature_cache_of_a_locked_tower(case, bert_dir):
    tower, x = build(case, bert_dir, feature_cache=16)
    tower.lock(0)
    tower.eval()
    with torch.no_grad():
        plain = tower.proj(tower.pool(tower.forward_tokens(x), tower.token_mask(x)))
        first, again = tower.embed(x), tower.embed(x.flip(0))
    assert torch.equal(first, plain) and torch.equal(again, plain.flip(0))
    assert (tower.feature_cache.hits, tower.feature_cache.misses) == (3, 3)


# --------------------------------------------------------------------------------------------------- positions


def _sincos_2d(h: int, w: int, hidden: int, temperature: float = 10000.0) -> torch.Tensor:
    """(2 * hidden, h, w): sin/cos of normalised row and column coordinates (row channels first), XCiT's layout."""
    eps = 1e-6
    rows = torch.arange(1, h + 1, dtype=torch.float32) / (h + eps) * 2 * math.pi
    cols = torch.arange(1, w + 1, dtype=torch.float32) / (w + eps) * 2 * math.pi
    freq = torch.tensor([temperature ** (2 * (i // 2) / hidden) for i in range(hidden)])
    channels = []
    for coord, shape in ((rows[:, None].expand(h, w), (h, w)), (cols[None, :].expand(h, w), (h, w))):
        for i in range(hidden):
            angle = coord / freq[i]
            channels.append((angle.sin() if i % 2 == 0 else angle.cos()).reshape(shape))
    return torch.stack(channels)  # (2 * hidden, h, w)


def test_xcit_positions_are_a_fixed_sincos_table(bert_dir):
    tower, _ = build(_case("xcit_sincos"), bert_dir)
    pe = tower.backbone.pos_embed
    # no position table is learned: the encoding's only parameters are its 1x1 projection
    assert {n for n, _ in pe.named_parameters()} == {"token_projection.weight", "token_projection.bias"}
    table = _sincos_2d(4, 4, pe.hidden_dim)  # 32 px / patch 8
    ref = F.conv2d(table[None], pe.token_projection.weight, pe.token_projection.bias)  # (1, D, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(pe(2, 4, 4), ref.expand(2, -1, -1, -1), atol=1e-5, rtol=1e-5)


def _permute_patches(x: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    g = H // patch
    p = x.reshape(B, C, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C, patch, patch)
    p = p[:, perm]  # (B, g*g, C, patch, patch), patches moved
    return p.reshape(B, g, g, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_eva02_positions_are_fixed_and_rotary(bert_dir):
    tower, x = build(_case("eva02_rope"), bert_dir)
    tower.eval()
    bb = tower.backbone
    with torch.no_grad():  # sharpen attention (random init leaves it near uniform, blind to any position signal)
        for blk in bb.blocks:
            blk.attn.qkv.weight.mul_(30.0)
    assert bb.pos_embed is None and not list(bb.rope.parameters())  # no learned positions anywhere
    emb = bb.rope.get_embed()  # (N, 2 * dim): sin then cos of the rotation angles
    sin, cos = emb.chunk(2, dim=-1)
    torch.testing.assert_close(sin**2 + cos**2, torch.ones_like(sin))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    xp = _permute_patches(x, 7, perm)
    with torch.no_grad():
        moved = tower.forward_tokens(xp)[:, 1:]
        expect = tower.forward_tokens(x)[:, 1:][:, perm]
        assert (moved - expect).abs().max() > 0.1  # positions matter: the rotary embedding sees the grid
        bb.rope = None  # control: without the rotary embedding the model is permutation-equivariant
        torch.testing.assert_close(tower.forward_tokens(xp)[:, 1:], tower.forward_tokens(x)[:, 1:][:, perm],
                                   atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------- image size


def test_image_size_is_stated_once():
    vit = IMAGE_CASES[0]
    tower = ImageTower(_image_cfg(vit), E)
    assert tower.timm_kwargs["img_size"] == 32 and tuple(tower.backbone.patch_embed.img_size) == (32, 32)
    ImageTower(ImageTowerConfig(name=vit.image[0], image_size=32, kwargs={**vit.image[2], "img_size": 32}), E)
    with pytest.raises(ValueError, match="remove img_size from model.image.kwargs"):
        ImageTower(ImageTowerConfig(name=vit.image[0], image_size=32, kwargs={**vit.image[2], "img_size": 16}), E)
    cnn = ImageTower(ImageTowerConfig(name="resnet10t", image_size=48), E)  # no img_size for a CNN
    assert "img_size" not in cnn.timm_kwargs and cnn.embed(torch.randn(1, 3, 48, 48)).shape == (1, E)
    with pytest.raises(ValueError, match="timm could not build image tower 'resnet10t'.*no_such_kwarg"):
        ImageTower(ImageTowerConfig(name="resnet10t", image_size=32, kwargs={"no_such_kwarg": 1}), E)


def test_channels_last_backbone_gives_tokens():
    """Swin's features come as (B, H, W, C): tokens are its grid cells, and pooling them is timm's own pooling."""
    cfg = ImageTowerConfig(name="swin_tiny_patch4_window7_224", image_size=56,
                           kwargs=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)))
    torch.manual_seed(0)
    tower = ImageTower(cfg, E).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = tower.forward_tokens(x)
        assert tokens.shape == (2, 4, tower.width) and tower.width == 128
        torch.testing.assert_close(tower.pool(tokens), tower.backbone(x), atol=1e-5, rtol=1e-5)
        taps, final = tower.forward_intermediates(x, [-1], final=True)  # the one-pass form, channels last too
    torch.testing.assert_close(final, tokens, atol=1e-6, rtol=1e-6)
    assert taps[0].shape == (2, 4, 128)


def test_token_transformer_stack():
    from contrast.layers import TokenTransformer

    torch.manual_seed(0)
    stack = TokenTransformer(50, 16, 3, 2, context_length=6).eval()
    stack.init_clip_()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        hidden, taps = stack(ids, return_layers=[-1, 0])
        by_embeds, _ = stack(embeds=stack.embed_tokens(ids))
        x = stack.token_embedding(ids) + stack.positional_embedding[:5]  # the stack run block by block
        outs = []
        for blk in stack.transformer.blocks:
            x = blk(x, causal=True)
            outs.append(x)
        final = stack.ln_final(x)
    assert hidden.shape == (2, 5, 16) and len(taps) == 2  # taps in block order: block 0, then the last
    assert torch.equal(taps[0], outs[0]) and torch.equal(taps[1], outs[-1]) and torch.equal(hidden, final)
    assert torch.equal(by_embeds, hidden)
    assert stack.positional_embedding.std().item() == pytest.approx(0.01, rel=0.3)
    with pytest.raises(ValueError, match="exceeds the context length 6"):
        stack(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of ids or embeds"):
        stack(ids, embeds=stack.embed_tokens(ids))


# --------------------------------------------------------------------------------------------------- training


def _colour_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    colours = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1),
               "black": (0, 0, 0)}
    g = torch.Generator().manual_seed(0)
    pixels = torch.stack([torch.tensor(c, dtype=torch.float32)[:, None, None].expand(3, size, size) for c in
                          colours.values()])
    pixels = (pixels - 0.5) / 0.25 + 0.1 * torch.randn(pixels.shape, generator=g)  # (6, 3, size, size)
    ids = ClipTokenizer(CTX)([f"a photo of something {name}" for name in colours])
    return pixels, ids


@pytest.mark.parametrize("case", IMAGE_CASES, ids=_ids(IMAGE_CASES))
def test_a_few_clip_steps_lower_the_loss(case, bert_dir):
    image, _ = build(case, bert_dir)
    text = TextTower(TextTowerConfig(context_length=CTX, width=32, layers=1, heads=2), E)
    pixels, ids = _colour_batch(case.image[1])
    scale = torch.tensor(1 / 0.07)
    params = list(image.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    image.train()
    text.train()

    def loss() -> torch.Tensor:
        return info_nce(F.normalize(image.embed(pixels), dim=-1), F.normalize(text.embed(ids), dim=-1), scale)

    losses = []
    for _ in range(10):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    with torch.no_grad():
        final = loss().item()
    assert math.isfinite(final) and final < 0.7 * losses[0], (losses, final)


def _mae_sincos(h: int, w: int, dim: int) -> np.ndarray:
    """The fixed 2-D table computed element by element: rows in the first half of the channels, columns in the
    second, each [sin, cos] over frequencies 10000 ** (-k / (dim / 4))."""
    q = dim // 4
    out = np.zeros((h * w, dim))
    for i in range(h):
        for j in range(w):
            for k in range(q):
                f = 10000.0 ** (-k / q)
                out[i * w + j, k], out[i * w + j, q + k] = math.sin(i * f), math.cos(i * f)
                out[i * w + j, 2 * q + k], out[i * w + j, 3 * q + k] = math.sin(j * f), math.cos(j * f)
    return out


def test_vit_sincos_positions_are_fixed_and_exact(bert_dir):
    tower, x = build(_case("vit_sincos"), bert_dir)
    pe = tower.backbone.pos_embed  # (1, 1 + 16, 32): class token, then the 4 x 4 patch grid
    assert "backbone.pos_embed" not in dict(tower.named_parameters())
    assert "backbone.pos_embed" in tower.state_dict()  # saved and exported under timm's own name
    np.testing.assert_allclose(pe[0, 1:].numpy(), _mae_sincos(4, 4, 32), atol=1e-6)
    assert float(pe[0, 0].abs().max()) == 0.0
    before = pe.clone()
    tower.lock(2)  # even a fully unlocked backbone cannot train the table
    opt = torch.optim.SGD([p for p in tower.parameters() if p.requires_grad], lr=1.0)
    tower.embed(x).square().sum().backward()
    opt.step()
    assert torch.equal(tower.backbone.pos_embed, before)
    with pytest.raises(ValueError, match="pos_embed sincos needs a ViT"):
        ImageTower(ImageTowerConfig(name="resnet10t", image_size=32, pos_embed="sincos"), E)
