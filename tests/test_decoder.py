"""The vision-language decoder: gated cross-attention leaves it unchanged at init, it reads an exported tower,
and on a task only the image can solve it learns a lower caption loss than the same decoder without images."""

from __future__ import annotations

import pytest
import torch

from contrast.config import (
    BridgeConfig,
    DecoderConfig,
    DecoderModelConfig,
    ImageTowerConfig,
    LossConfig,
    TextTowerConfig,
)
from contrast.export import export_timm
from contrast.models import build_model
from contrast.models.decoder import VisionLanguageDecoder
from contrast.objectives import build_objective, lm_nll
from contrast.runs import build

VOCAB = 12  # ids 1..10 "colour words", 11 end-of-text (the highest id, as in the project's tokenizer)


def _cfg(mode: str, use_images: bool = True, tower: str | None = None) -> DecoderModelConfig:
    return DecoderModelConfig(
        kind="decoder",
        embed_dim=16,
        image=ImageTowerConfig(name="vit_tiny_patch16_224", image_size=16,
                               kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, pre_norm=True)),
        text=TextTowerConfig(context_length=4, vocab_size=VOCAB),
        bridge=BridgeConfig(mode=mode, use_images=use_images, tower=tower, taps=[0, -1],
                            decoder=DecoderConfig(width=32, layers=2, heads=2, max_positions=16)),
    )


def _batch(n: int, g: torch.Generator, visual: int = 4) -> dict[str, torch.Tensor]:
    """Image i shows one of 10 fixed patterns c; its sample is [start, image x visual, c, 11] with the answer
    (c, end-of-text) the only labels: the word is only in the image."""
    c = torch.randint(1, 11, (n,), generator=g)
    patterns = torch.randn(11, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    z = torch.zeros_like(c)
    ids = torch.stack([z, *[z] * visual, c, torch.full_like(c, 11)], dim=1)  # (n, 3 + visual)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    vis = torch.zeros_like(ids, dtype=torch.bool)
    vis[:, 1 : 1 + visual] = True
    rows = torch.ones_like(vis)  # the image is read from the start token on
    return {"pixels": patterns[c], "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "visual_mask": vis, "image_rows": rows}


def test_xattn_decoder_unchanged_at_init():
    torch.manual_seed(0)
    model = build_model(_cfg("xattn")).eval()
    assert isinstance(model, VisionLanguageDecoder) and len(model.xattn) == 2
    batch = _batch(4, torch.Generator().manual_seed(0), visual=0)
    with torch.no_grad():
        with_img = model(batch).lm.logits
        without = model.text_only(batch).lm.logits
        assert torch.equal(with_img, without)
        for blk in model.xattn.values():  # opening a gate makes the images matter
            blk.gate_attn.fill_(1.0)
        assert (model(batch).lm.logits - without).abs().max() > 1e-4


def test_unified_output_shapes_and_targets():
    torch.manual_seed(0)
    model = build_model(_cfg("unified")).eval()
    assert model.num_visual_tokens == 4  # 2x2 patches of the penultimate block
    batch = _batch(3, torch.Generator().manual_seed(0))
    out = model(batch)
    # [start, v x 4, c, 11]: positions 4 and 5 predict the answer (c, then end-of-text); nothing else is a target
    assert out.lm.logits.shape == (6, VOCAB) and out.lm.num_captions == 3
    assert out.lm.rows.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.lm.targets.tolist() == batch["input_ids"][:, -2:].reshape(-1).tolist()
    visual = model.visual_tokens(batch["pixels"])
    assert visual.shape == (3, 4, 32)
    with torch.no_grad():  # the packed logits are the full sequence's logits at those positions, visual tokens in place
        x = model.lm.embed(batch["input_ids"])
        x[:, 1:5] = visual
        h, _ = model.lm.hidden(x)
        assert torch.allclose(model.lm.logits(h)[:, 4:6].reshape(6, VOCAB), out.lm.logits, atol=1e-6)


def _train(cfg: DecoderModelConfig, steps: int = 40) -> float:
    torch.manual_seed(0)
    model = build_model(cfg)
    obj = build_objective(LossConfig(itc=0.0, lm=1.0, lm_label_smoothing=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    visual = model.num_visual_tokens if model.splices else 0
    model.train()
    for _ in range(steps):
        loss = obj(model(_batch(32, g, visual))).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        lm = model(_batch(256, torch.Generator().manual_seed(99), visual)).lm
    nll, n = lm_nll(lm.logits, lm.targets)
    return nll / n


@pytest.mark.parametrize("mode", ["unified", "xattn"])
def test_images_lower_the_caption_loss(mode):
    with_images, without = _train(_cfg(mode)), _train(_cfg(mode, use_images=False))
    # without images the colour word is a 1-in-10 guess: half the tokens cost >= ln(10) / 2 ~ 1.15 nats on average
    assert without > 1.0
    assert with_images < without - 0.25, (with_images, without)  # a clear gap, not seed noise


def test_decoder_reads_an_exported_tower_frozen(tmp_path):
    torch.manual_seed(0)
    src = build_model(_cfg("unified")).image.eval()
    export_timm(src, tmp_path / "tower")
    model = build(_cfg("unified", tower=str(tmp_path / "tower")))
    assert not any(p.requires_grad for p in model.image.parameters())
    model.train()
    assert not model.image.training  # a frozen tower stays in eval mode
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.image.forward_intermediates(x, [0])[0], src.forward_intermediates(x, [0])[0], atol=1e-6)
    bad = _cfg("unified", tower=str(tmp_path / "tower"))
    bad.image.image_size = 32
    with pytest.raises(ValueError, match="image_size"):
        build(bad)
