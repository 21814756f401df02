"""Every export loads in the client its users load it with, from a fresh process, through the README's own snippets.

The README's loading snippets (the ```python blocks of its export section whose first line is a ``# ... export``
comment) are run verbatim in a new interpreter, with only the export directory and the image path replaced; what they
compute (``embed``, and ``text_embed`` / ``hidden`` where a snippet has them) is compared with contrast's own features
of the same image, computed here through ``contrast.load`` and contrast's eval preprocessing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contrast import load
from contrast.cli import main
from contrast.config import ClipModelConfig, Config, ImageTowerConfig, TextTowerConfig, save_config
from contrast.models import build_model
from contrast.runs import WEIGHTS, save_model_weights, step_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
S = 32
# contrast's features against the client's, as the README states them: 1.2e-7 (float32 rounding of values near 1);
# open_clip runs its own attention (nn.MultiheadAttention), whose sums round differently: 1e-6 (measured 4.8e-7,
# two float32 steps of a feature near 2)
TOLERANCE = {"timm": 1.2e-7, "hf": 1.2e-7, "open_clip": 1e-6}
TOWERS = {  # run name -> timm name, kwargs
    "clip": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, pre_norm=True)),
    "siglip": ("vit_base_patch16_siglip_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)),
    "cnn": ("resnet10t", {}),
}
# (the start of a snippet's title, its first comment line; the run; the export format; the README's folder for it)
SNIPPETS = [
    ("timm export, loaded by timm", "clip", "timm", "exports/tower_timm"),
    ("timm export, loaded by transformers", "clip", "timm", "exports/tower_timm"),
    ("timm export, loaded by transformers", "cnn", "timm", "exports/tower_timm"),
    ("open_clip export, loaded by open_clip", "clip", "open_clip", "exports/clip_oc"),
    ("hf export of a class-token ViT", "clip", "hf", "exports/tower_hf"),
    ("hf export of a SigLIP-style ViT", "siglip", "hf", "exports/tower_hf"),
]


def readme_snippets() -> dict[str, str]:
    """The README's ```python blocks whose first line is a comment, by that comment (without '# ')."""
    blocks = re.findall(r"```python\n(# [^\n]+)\n(.*?)```", README.read_text(), flags=re.S)
    return {title[2:]: f"{title}\n{body}" for title, body in blocks}


def _write_run(name: str, out: Path) -> Path:
    tname, kwargs = TOWERS[name]
    torch.manual_seed(0)
    mcfg = ClipModelConfig(
        image=ImageTowerConfig(name=tname, kwargs=kwargs, image_size=S, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
        text=TextTowerConfig(context_length=12, width=32, layers=1, heads=2),
        embed_dim=24,
    )
    model = build_model(mcfg).eval()
    with torch.no_grad():  # timm zero-inits biases and the class token: perturb so every tensor counts
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out.mkdir(parents=True)
    save_config(Config(model=mcfg), out / "config.yaml")
    step = step_dir(out, 0)
    step.mkdir(parents=True)
    save_model_weights(model, step / WEIGHTS)
    (out / "checkpoints" / "latest").write_text(step.name + "\n")
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Three tiny runs (class-token ViT, SigLIP-style ViT, CNN), exported through the CLI in every format that fits."""
    root = tmp_path_factory.mktemp("clients")
    done = {}
    for run, fmt in sorted({(r, f) for _, r, f, _ in SNIPPETS}):
        path = root / "runs" / run
        if not path.exists():
            _write_run(run, path)
        out = root / "exports" / f"{run}_{fmt}"
        assert main(["export", "--checkpoint", str(path), "--format", fmt, "--out", str(out)]) == 0
        done[run, fmt] = out
    return done


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """Noise, 90 x 64: resized to 45 x 32 and cropped; Hugging Face's floored crop offset is ours at this size."""
    path = tmp_path_factory.mktemp("image") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 90, 3), dtype=np.uint8)).save(path)
    return path


def run_snippet(code: str, names: tuple[str, ...], out: Path) -> dict[str, torch.Tensor]:
    """Run ``code`` in a fresh interpreter and bring back the tensors it leaves in ``names``."""
    saved = out / "client.pt"
    code += f"\nimport torch\ntorch.save({{n: globals()[n] for n in {names!r}}}, {str(saved)!r})\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], cwd=out, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(saved)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("title, run, fmt, readme_dir", SNIPPETS, ids=[f"{t} ({r})" for t, r, _, _ in SNIPPETS])
def test_readme_snippet_loads_export_in_its_client(title, run, fmt, readme_dir, exports, image, tmp_path):
    found = [code for t, code in readme_snippets().items() if t.startswith(title)]
    assert len(found) == 1, f"README.md should hold one snippet starting '# {title}', found {len(found)}"
    code = found[0]
    assert readme_dir in code and '"cat.jpg"' in code
    code = code.replace(readme_dir, str(exports[run, fmt])).replace('"cat.jpg"', repr(str(image)))
    names = ("embed",) + tuple(n for n in ("text_embed", "hidden") if re.search(rf"^\s*{n} = ", code, flags=re.M))
    theirs = run_snippet(code, names, tmp_path)

    model, preprocess, tokenizer = load(exports[run, fmt].parent.parent / "runs" / run)
    x = preprocess(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        ours = {"embed": model.encode_image(x, normalize=False)}
        if "text_embed" in names:
            ours["text_embed"] = model.encode_text(tokenizer(["a photo of a cat"]), normalize=False)
        if "hidden" in names:
            ours["hidden"] = model.image.forward_intermediates(x, [-2])[0]
    diffs = {n: _max_diff(ours[n], theirs[n]) for n in names}
    assert all(d <= TOLERANCE[fmt] for d in diffs.values()), (diffs, TOLERANCE[fmt])


def test_timm_export_states_num_classes_once_and_older_exports_still_load(exports, tmp_path):
    from transformers import AutoModel

    from contrast.runs import load_exported_tower

    src = exports["clip", "timm"]
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["pretrained_cfg"]["num_classes"] == 0 and "num_classes" not in cfg["model_args"]
    old = tmp_path / "old"  # as exports were written before: num_classes in model_args too
    old.mkdir()
    for f in src.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    cfg["model_args"]["num_classes"] = 0
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TypeError, match="multiple values for keyword argument 'num_classes'"):
        AutoModel.from_pretrained(str(old))  # what transformers made of the older layout
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = load_exported_tower(src).embed(x)
        assert torch.equal(load_exported_tower(old).embed(x), want)


def test_hf_refusal_names_the_timm_route(exports, tmp_path, capsys):
    run = exports["cnn", "timm"].parent.parent / "runs" / "cnn"
    assert main(["export", "--checkpoint", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "--format timm" in err and "AutoModel.from_pretrained(DIR)" in err and "TimmWrapperModel" in err
    assert len(err.strip().splitlines()) == 1


def test_pil_pixels_through_the_processors_the_readme_names(exports, image):
    from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPImageProcessorPil

    d = str(exports["clip", "hf"])
    _, preprocess, _ = load(exports["clip", "hf"].parent.parent / "runs" / "clip")
    img = Image.open(image).convert("RGB")
    ours = preprocess(img)
    for processor in (AutoImageProcessor.from_pretrained(d, backend="pil"), CLIPImageProcessorPil.from_pretrained(d)):
        got = processor(img, return_tensors="pt")["pixel_values"][0]
        assert _max_diff(got, ours) <= 1e-6, type(processor).__name__
    with pytest.raises(AttributeError, match="backend"):  # the README's warning: the class fixes its backend
        CLIPImageProcessor.from_pretrained(d, backend="pil")
