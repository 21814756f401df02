"""The unified-embedding decoder exported as a Hugging Face LLaVA folder: transformers reloads it alone (a fresh
process, its own processor from the folder) and generates the same tokens as contrast for the same image and prompt;
what has no LLaVA equivalent is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from lm_fixtures import tiny_hf_folder
from PIL import Image

from contrast.cli import main
from contrast.config import from_dict
from contrast.export import ExportError
from contrast.export_llava import export_llava
from contrast.generate import greedy, prompt_batch
from contrast.runs import build

TOWER = {"name": "vit_tiny_patch16_224", "image_size": 16,
         "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "pre_norm": True}}

CLIENT = """
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
folder, image = sys.argv[1], sys.argv[2]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
prompt = json.load(open(f"{folder}/contrast_prompt.json"))
messages = ([{"role": "system", "content": prompt["system"]}] if prompt["system"] else []) + [
    {"role": "user", "content": prompt["user_content"]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(json.dumps(out[0, inputs["input_ids"].shape[1]:].tolist()))
"""


def _cfg(lm: str, **bridge) -> object:
    return from_dict({"model": {"kind": "decoder", "embed_dim": 16, "image": TOWER, "bridge": {
        "mode": "unified", **bridge, "decoder": {"source": "hf", "hf_path": lm, "system": "You name things.",
                                                 "instruction": "Describe this image.", "max_length": 96}}}})


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return str(tiny_hf_folder(tmp_path_factory.mktemp("lm") / "qwen2", "qwen2", seed=5))


def test_llava_export_generates_what_contrast_generates(lm, tmp_path):
    torch.manual_seed(0)
    model = build(_cfg(lm).model).eval()
    with torch.no_grad():  # larger weights than a fresh init, so the answers are not one repeated token
        for p in model.parameters():
            p.mul_(4.0 if p.ndim >= 2 else 1.0)
    report = export_llava(model, tmp_path / "llava")
    assert report.checks["visual_tokens"] == 0.0 and report.checks["next_token_logits"] < 1e-5
    image = tmp_path / "x.png"
    Image.new("RGB", (24, 19), (200, 30, 90)).save(image)  # not square: the processor's resize and crop are ours
    client = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path / "llava"), str(image)], check=True,
                            capture_output=True, text=True)
    theirs = json.loads(client.stdout.strip().splitlines()[-1])
    from contrast.data.transforms import build_transform

    pixels = build_transform(model.image.cfg)(Image.open(image).convert("RGB"))[None]
    ours = greedy(model, prompt_batch(model.text_tokenizer(), pixels), 8)[0][0]
    eos = set(model.eos_token_ids)
    assert theirs[: len(ours)] == ours and (len(ours) == 8 or ours[-1] in eos)
    assert len(set(ours)) > 1


def test_what_llava_cannot_hold_is_refused(lm, tmp_path, capsys):
    for bridge, why in (({"projector": "pixel_shuffle"}, "2-layer GELU MLP"),
                        ({"mode": "xattn", "taps": [0, -1]}, "its bridge is xattn"),
                        ({"embedding_token": True}, "image embedding as a visual token")):
        with pytest.raises(ExportError, match=why):
            export_llava(build(_cfg(lm, **bridge).model), tmp_path / "x")
    cfg = _cfg(lm)
    cfg.model.image.kwargs = {**TOWER["kwargs"], "pre_norm": False}
    with pytest.raises(ExportError, match="pre-LayerNorm"):
        export_llava(build(cfg.model), tmp_path / "y")
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--format", "llava", "--out",
                 str(tmp_path / "z")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_llava_export_folds_lora_adapters_into_the_lm(lm, tmp_path):
    cfg = _cfg(lm)
    cfg.model.bridge.decoder.stage, cfg.model.bridge.decoder.lora_rank = "finetune", 2
    torch.manual_seed(0)
    model = build(cfg.model).eval()
    with torch.no_grad():
        for adapter in model.lora.values():
            adapter.B.normal_(std=0.5)
    report = export_llava(model, tmp_path / "llava")  # reloaded logits checked against the adapted model
    assert report.checks["next_token_logits"] < 1e-5
