"""Q-Former: the three attention masks element by element, and equivalence with transformers' Blip2QFormerModel."""

from __future__ import annotations

import pytest
import torch

from contrast.config import QFormerConfig
from contrast.models.qformer import QFormer, attention_mask, text_padding_mask

Q, T = 3, 4


def _text_mask() -> torch.Tensor:
    # row 0: all four text tokens real; row 1: the last two are padding
    return torch.tensor([[True, True, True, True], [True, True, False, False]])


def _expected(kind: str, b: int, i: int, j: int, text_mask: torch.Tensor) -> bool:
    """Whether position i may attend to position j, from the rules written out one case at a time."""
    i_query, j_query = i < Q, j < Q
    if not j_query and not bool(text_mask[b, j - Q]):
        return False  # padding is never attended to
    if kind == "itm":
        return True
    if kind == "itc":
        return i_query == j_query
    # itg
    if i_query:
        return j_query
    return j_query or j <= i


@pytest.mark.parametrize("kind", ["itc", "itm", "itg"])
def test_masks_element_by_element(kind):
    tm = _text_mask()
    m = attention_mask(kind, Q, tm)
    assert m.shape == (2, Q + T, Q + T) and m.dtype == torch.bool
    for b in range(2):
        for i in range(Q + T):
            for j in range(Q + T):
                assert bool(m[b, i, j]) == _expected(kind, b, i, j, tm), (kind, b, i, j)


def test_masks_hand_written():
    tm = torch.ones(1, 2, dtype=torch.bool)
    # Q = 2 queries then 2 text tokens; rows attend, columns are attended to
    itc = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    itm = [[1, 1, 1, 1]] * 4
    itg = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    for kind, want in (("itc", itc), ("itm", itm), ("itg", itg)):
        assert attention_mask(kind, 2, tm)[0].int().tolist() == want, kind
    with pytest.raises(ValueError, match="unknown Q-Former mask"):
        attention_mask("xyz", 2, tm)


def test_text_padding_mask_uses_end_of_text():
    ids = torch.tensor([[49406, 0, 320, 49407, 0, 0], [49406, 320, 321, 322, 323, 49407]])
    assert text_padding_mask(ids).int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


def _tiny(vision_width=12, **kw) -> QFormer:
    cfg = QFormerConfig(num_queries=Q, width=16, layers=3, heads=2, mlp_ratio=2.0, cross_attention_every=2, **kw)
    return QFormer(cfg, vision_width=vision_width, vocab_size=50, context_length=8).eval()


def test_itc_mask_equals_separate_streams():
    """Under the ITC mask, queries and text in one pass give what the query-only and text-only passes give."""
    torch.manual_seed(0)
    qf = _tiny()
    img = torch.randn(2, 5, 12)
    ids = torch.tensor([[1, 5, 7, 49, 0, 0], [1, 8, 49, 0, 0, 0]])
    both = qf(img, ids, "itc")
    assert torch.allclose(both[:, :Q], qf.encode_queries(img), atol=1e-6)
    assert torch.allclose(both[:, Q:], qf.encode_text(ids), atol=1e-6)


def test_itg_queries_ignore_text_and_text_is_causal():
    torch.manual_seed(0)
    qf = _tiny()
    img = torch.randn(2, 5, 12)
    ids = torch.tensor([[1, 5, 7, 9, 49], [1, 8, 3, 2, 49]])
    out = qf(img, ids, "itg")
    assert torch.allclose(out[:, :Q], qf.encode_queries(img), atol=1e-6)
    ids2 = ids.clone()
    ids2[:, 3] = 11  # change a later token: earlier text outputs must not move
    out2 = qf(img, ids2, "itg")
    assert torch.allclose(out[:, : Q + 3], out2[:, : Q + 3], atol=1e-6)
    assert not torch.allclose(out[:, Q + 3 :], out2[:, Q + 3 :])
    # under ITM the same change reaches the queries
    assert not torch.allclose(qf(img, ids, "itm")[:, :Q], qf(img, ids2, "itm")[:, :Q])


def test_cross_attention_every_k_layers():
    qf = _tiny()
    assert [layer.xattn is not None for layer in qf.layers] == [True, False, True]
    with pytest.raises(ValueError, match="width 7"):
        qf(torch.randn(1, 5, 7))


# --------------------------------------------------------------------------------------------------- Hugging Face


def _hf_pair():
    transformers = pytest.importorskip("transformers")
    from contrast.towers.convert_hf_qformer import convert_hf_qformer

    torch.manual_seed(0)
    hf_cfg = transformers.Blip2QFormerConfig(
        vocab_size=51, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=10, cross_attention_frequency=2, encoder_hidden_size=24,
        use_qformer_text_input=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    hf_cfg._attn_implementation = "eager"
    hf = transformers.models.blip_2.modeling_blip_2.Blip2QFormerModel(hf_cfg).eval()
    emb = transformers.models.blip_2.modeling_blip_2.Blip2TextEmbeddings(hf_cfg).eval()
    with torch.no_grad():  # random weights everywhere (LayerNorms and biases included), not the init defaults
        for p in list(hf.parameters()) + list(emb.parameters()):
            p.copy_(torch.randn_like(p) * 0.2)
        for m in hf.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
    query_tokens = torch.randn(1, 4, 32)
    conv = convert_hf_qformer(hf.state_dict(), query_tokens, embeddings=emb.state_dict(), config=hf_cfg)
    ours = QFormer(conv.cfg, **conv.sizes)
    ours.load_state_dict(conv.state_dict)  # strict: with text input and embeddings every tensor is converted
    return hf, emb, query_tokens, ours.eval()


def _hf_mask(mask: torch.Tensor) -> torch.Tensor:
    """Our boolean (B, L, L) mask as the additive (B, 1, L, L) float mask transformers accepts."""
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]


def test_converted_weights_match_hf_queries_only():
    hf, _, query_tokens, ours = _hf_pair()
    img = torch.randn(2, 7, 24)
    with torch.no_grad():
        want = hf(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=img).last_hidden_state
        got = ours.encode_queries(img)
    assert got.shape == want.shape == (2, 4, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["itm", "itg", "itc"])
def test_converted_weights_match_hf_with_text(kind):
    hf, emb, query_tokens, ours = _hf_pair()
    img = torch.randn(2, 7, 24)
    ids = torch.tensor([[3, 9, 17, 50, 0, 0], [3, 11, 50, 0, 0, 0]])  # id 50 is the highest: end of text
    tm = text_padding_mask(ids)
    mask = attention_mask(kind, 4, tm)
    with torch.no_grad():
        embeds = emb(input_ids=ids, query_embeds=query_tokens.expand(2, -1, -1))
        want = hf(
            query_embeds=embeds, query_length=4, attention_mask=_hf_mask(mask), encoder_hidden_states=img
        ).last_hidden_state
        got = ours(img, ids, kind)
    real = torch.cat([torch.ones(2, 4, dtype=torch.bool), tm], dim=1)  # padding rows are not compared
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_converted_weights_match_hf_text_only():
    hf, emb, _, ours = _hf_pair()
    ids = torch.tensor([[3, 9, 17, 50], [3, 11, 50, 0]])
    with torch.no_grad():
        want = hf(query_embeds=emb(input_ids=ids), query_length=0,
                  attention_mask=text_padding_mask(ids).long()).last_hidden_state
        got = ours.encode_text(ids)
    real = text_padding_mask(ids)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_converter_rejects_mismatched_query_width():
    hf, emb, _, _ = _hf_pair()
    from contrast.towers.convert_hf_qformer import convert_hf_qformer

    with pytest.raises(ValueError, match="query tokens"):
        convert_hf_qformer(hf.state_dict(), torch.randn(1, 4, 31), embeddings=emb.state_dict(), config=hf.config)


def test_converted_state_dict_is_checked_against_the_built_qformer():
    hf, emb, query_tokens, _ = _hf_pair()
    from contrast.towers.convert_hf_qformer import convert_hf_qformer, load_converted_qformer

    # without the text feed-forward and the embeddings: a partial state dict, the rest keeps its initial values
    no_text = {k: v for k, v in hf.state_dict().items() if ".intermediate." not in k and ".output." not in k
               or "_query" in k or "attention" in k}
    conv = convert_hf_qformer(no_text, query_tokens, config=hf.config)
    assert "word_embeddings.weight" not in conv.state_dict and not any("mlp_text" in k for k in conv.state_dict)
    qf = load_converted_qformer(QFormer(conv.cfg, **conv.sizes), conv.state_dict)
    assert torch.equal(qf.query_tokens, query_tokens)
    # the [DEC] row follows the Hugging Face vocabulary
    full = convert_hf_qformer(hf.state_dict(), query_tokens, embeddings=emb.state_dict(), config=hf.config)
    assert full.state_dict["word_embeddings.weight"].shape == (hf.config.vocab_size + 1, 32)
    # a Q-Former of another shape, or a foreign tensor name, is refused with the offending keys named
    other = QFormer(conv.cfg, vision_width=conv.vision_width + 1, vocab_size=conv.vocab_size,
                    context_length=conv.context_length)
    with pytest.raises(ValueError, match="do not fit: .*xattn.kv.weight"):
        load_converted_qformer(other, conv.state_dict)
    with pytest.raises(ValueError, match="do not fit: .*'nope'"):
        load_converted_qformer(QFormer(conv.cfg, **conv.sizes), {**conv.state_dict, "nope": torch.zeros(1)})
