"""Export of a unified-embedding decoder run as one Hugging Face ``LlavaForConditionalGeneration`` folder: the vision
tower (as ``CLIPVisionModel``), the ``mlp2x_gelu`` projector (``multi_modal_projector``), the language model, and a
``LlavaProcessor`` with the image token and the tower's preprocessing, so transformers reloads and runs it alone.

What has no LLaVA equivalent is refused in one line naming why: the cross-attention bridge and BLIP-2 (other
architectures), a ``linear`` or ``pixel_shuffle`` projector (LLaVA's projector is a 2-layer MLP), the project's own
LM (it is no transformers model), a tower that does not fit ``CLIPVisionModel``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from contrast.decoders import HFLanguageModel
from contrast.decoders.lora import merged_weight
from contrast.export import ExportError, ExportReport, _check, _hf_preprocessor, _write_preprocess_note
from contrast.models.decoder import VisionLanguageDecoder
from contrast.towers.convert import hf_clip_problems, vit_to_hf_clip

IMAGE_TOKEN = "<image>"


def llava_problems(model: VisionLanguageDecoder) -> list[str]:
    """Why a decoder model cannot become a LLaVA folder (empty: it can)."""
    b = model.cfg.bridge
    p = []
    if b.mode != "unified":
        p.append(f"its bridge is {b.mode}; LLaVA reads visual tokens in the prompt (unified)")
    if b.projector != "mlp2x_gelu":
        p.append(f"its projector is {b.projector}; LLaVA's projector is the 2-layer GELU MLP (mlp2x_gelu)")
    if b.embedding_token:
        p.append("it reads the tower's image embedding as a visual token (embedding_token); LLaVA's projector reads "
                 "the tower's patch tokens only")
    if not isinstance(model.lm, HFLanguageModel):
        p.append("its language model is the project's own; LLaVA needs a Hugging Face causal LM (decoder source hf)")
    if not model.use_images:
        p.append("it was trained with use_images: false")
    tower = model.image
    p += [f"its tower does not fit CLIPVisionModel ({x})" for x in hf_clip_problems(tower.backbone, tower.cfg.pool)]
    return p


def _config(model: VisionLanguageDecoder, vision_kwargs: dict, image_token_id: int, vocab: int):
    from transformers import CLIPVisionConfig, LlavaConfig

    b, tower = model.cfg.bridge, model.image
    blocks = tower.num_blocks
    layer = b.layer % blocks + 1  # hidden_states[0] is the embeddings; block k's output is hidden_states[k + 1]
    text_config = model.lm.hf.config.to_dict()
    text_config["vocab_size"] = vocab
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs).to_dict(), text_config=text_config,
        image_token_id=image_token_id, projector_hidden_act="gelu", vision_feature_layer=layer,
        vision_feature_select_strategy="default" if b.tokens == "patch" else "full",
        image_seq_length=model.num_visual_tokens, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(model.lm.hf.config, "tie_word_embeddings", False)))


def export_llava(model: VisionLanguageDecoder, out: str | Path) -> ExportReport:
    """Write ``model`` as a LLaVA folder (weights, config, processor); checks the reloaded model's visual tokens
    and next-token logits against contrast's on probe inputs."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    problems = llava_problems(model)
    if problems:
        raise ExportError("this decoder has no LLaVA equivalent: " + "; ".join(problems))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    tok = model.codec.tok
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = max(model.lm.vocab_size, len(tok))
    vision_kwargs, vision_sd = vit_to_hf_clip(model.image.backbone, model.image.proj.weight, model.image.cfg.pool)
    llava = LlavaForConditionalGeneration(_config(model, vision_kwargs, image_token_id, vocab)).eval()
    _load(llava, model, vision_sd, vocab)
    llava.save_pretrained(str(out))
    pre = {k: v for k, v in _hf_preprocessor(model.image).items() if k != "image_processor_type"}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(**pre), tokenizer=tok, patch_size=vision_kwargs["patch_size"],
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1, chat_template=tok.chat_template)
    processor.save_pretrained(str(out))
    _write_preprocess_note(model.image, out)
    (out / "contrast_prompt.json").write_text(json.dumps({
        "system": model.cfg.bridge.decoder.system, "instruction": model.cfg.bridge.decoder.instruction,
        "user_content": f"{IMAGE_TOKEN}\n{model.cfg.bridge.decoder.instruction}".rstrip("\n")}, indent=2))
    return _verify(model, LlavaForConditionalGeneration.from_pretrained(str(out)).eval(), out)


def export_llava_checkpoint(checkpoint: str | Path, out: str | Path) -> ExportReport:
    """``contrast export --format llava``: the decoder run ``checkpoint`` as a LLaVA folder."""
    from contrast.runs import load_model

    model = load_model(checkpoint)
    if not isinstance(model, VisionLanguageDecoder):
        raise ExportError(f"{checkpoint} holds a {type(model).__name__}; the llava format exports a decoder run (model "
                          "kind decoder, unified bridge); export its image tower with --format timm or hf")
    return export_llava(model, out)


def _load(llava, model: VisionLanguageDecoder, vision_sd: dict[str, torch.Tensor], vocab: int) -> None:
    inner = llava.model
    nested = any(k.startswith("vision_model.") for k in inner.vision_tower.state_dict())
    sd = {(k if nested else k[len("vision_model."):]): v for k, v in vision_sd.items() if k.startswith("vision_model.")}
    missing, unexpected = inner.vision_tower.load_state_dict(sd, strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise ExportError(f"LLaVA vision tower key map incomplete: missing {missing}, unexpected {unexpected}")
    proj = model.bridge.projector
    with torch.no_grad():
        for ours, theirs in ((proj.fc1, inner.multi_modal_projector.linear_1), (proj.fc2, inner.multi_modal_projector.linear_2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        hf = model.lm.hf
        lm_sd = dict(hf.base_model.state_dict())
        where = {id(m): n for n, m in hf.base_model.named_modules()}
        for key, adapter in model.lora.items():  # low-rank adapters folded into their layers' weights
            layer = model.lm.get_submodule(key.replace("__", "."))
            lm_sd[f"{where[id(layer)]}.weight"] = merged_weight(layer, adapter)
        emb_key = next(k for k, v in lm_sd.items() if v is hf.get_input_embeddings().weight or
                       v.data_ptr() == hf.get_input_embeddings().weight.data_ptr())
        lm_sd[emb_key] = _grown(lm_sd[emb_key], vocab)
        inner.language_model.load_state_dict(lm_sd, strict=True)
        llava.lm_head.weight.copy_(_grown(hf.get_output_embeddings().weight, vocab))


def _grown(w: torch.Tensor, rows: int) -> torch.Tensor:
    """``w`` (V, W) with rows appended up to ``rows`` (the image token's row: never read, its embedding replaced)."""
    return torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])]) if rows > w.shape[0] else w


def _verify(model: VisionLanguageDecoder, llava, out: Path) -> ExportReport:
    report = ExportReport("llava", out)
    S = model.image.cfg.image_size
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    batch = model.text_tokenizer().prompts(2)
    ids = batch["input_ids"].clone()
    ids[batch["visual_mask"]] = llava.config.image_token_id
    with torch.no_grad():
        ours_visual = model.visual_tokens(x)
        theirs_visual = llava.model.get_image_features(pixel_values=x)
        theirs_visual = getattr(theirs_visual, "pooler_output", theirs_visual)
        theirs_visual = torch.stack(list(theirs_visual)) if isinstance(theirs_visual, list | tuple) else theirs_visual
        _check(report, "visual_tokens", ours_visual, theirs_visual.reshape(ours_visual.shape))
        ours, _ = model.prefill({**batch, "pixels": x})
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        theirs = llava(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=x, position_ids=pos).logits
        _check(report, "next_token_logits", ours, theirs[:, -1].float())
    return report
