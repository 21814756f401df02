"""contrast plan: predictions checked against measured runs, the advice's order, the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from contrast import plan as P
from contrast.cli import main
from contrast.config import from_dict, load_recipe
from contrast.objectives import info_nce

ROOT = Path(__file__).resolve().parents[1]

# activations dominate: a 64 px ViT with patch 4 (257 tokens) at batch 128 grows a step by about 350 MB
BIG_ACTIVATIONS = {
    "model": {"kind": "clip", "embed_dim": 64,
              "image": {"name": "vit_tiny_patch16_224", "image_size": 64,
                        "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}},
              "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}},
    "train": {"batch_size": 128},
}

# one training step in a fresh process: resident-memory growth from after building model and optimizer to the peak
MEASURE_STEP = r"""
import gc, sys, torch
from contrast.config import load_recipe
from contrast.objectives import build_objective
from contrast.runs import build
from contrast.train.optim import build_optimizer

def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

torch.set_num_threads(1)  # memory does not depend on it; time on a shared CPU does
cfg = load_recipe(sys.argv[1], sys.argv[2:])
torch.manual_seed(0)
model = build(cfg.model).train()
objective, opt = build_objective(cfg.loss), build_optimizer(model, cfg.train)
B, S, T = cfg.train.batch_size, cfg.model.image.image_size, cfg.model.text.context_length
gc.collect()
base = rss("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
except OSError:
    pass
for _ in range(2):
    batch = {"pixels": torch.randn(B, 3, S, S), "input_ids": torch.randint(1, cfg.model.text.vocab_size, (B, T))}
    loss = objective(model(batch)).total
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    del batch, loss
print(rss("VmHWM") - base)
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The recipe above written to a file, its config and its measurement."""
    recipe = tmp_path_factory.mktemp("plan") / "big.yaml"
    recipe.write_text(yaml.safe_dump(BIG_ACTIVATIONS))
    cfg = load_recipe(recipe)
    return recipe, cfg, P.measure(cfg)


def measured_step_growth(recipe: Path, overrides: list[str]) -> int:
    # freed tensors go back to the system at once (glibc would otherwise keep some, and the peak would count them)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE_STEP, str(recipe), *overrides], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_predicted_step_memory_matches_a_measured_step(big, checkpointing):
    """Activations, workspace, loss, gradients and AdamW state predicted from micro-steps at batches 2 and 4 are
    within 25% of the resident-memory growth of real steps at batch 128."""
    recipe, cfg, meas = big
    target = P.Target(memory_gib=80)
    mem = P.memory(cfg, meas, target, P.Setting(128, checkpointing, False))
    predicted = mem["total"] - mem["weights"]
    sets = ["model.image.grad_checkpointing=true", "model.text.grad_checkpointing=true"] if checkpointing else []
    measured = measured_step_growth(recipe, sets)
    print(f"checkpointing={checkpointing}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert measured > (100e6 if checkpointing else 200e6)  # far above allocator noise
    assert abs(predicted - measured) / measured < 0.25


def test_activations_are_linear_in_the_batch(big):
    _, cfg, meas = big
    assert meas.saved.per_sample > 2e6  # 257 tokens x 64 wide x 2 blocks saves megabytes per sample
    assert meas.saved_ckpt.per_sample < meas.saved.per_sample / 3  # checkpointing keeps block inputs only
    assert meas.flops_step_ckpt.per_sample > meas.flops_step.per_sample  # it recomputes the blocks
    assert abs(meas.saved.fixed) < 0.05 * meas.saved.at(128)


def transformer_hand_count(tokens: int, width: int, layers: int) -> tuple[int, int]:
    """Forward FLOPs per sequence of pre-LN blocks (MLP ratio 4): (linear layers, attention's two matmuls)."""
    linear = 2 * tokens * width * 3 * width + 2 * tokens * width * width + 2 * 2 * tokens * width * 4 * width
    attention = 2 * 2 * tokens * tokens * width  # QK^T and AV, all heads together
    return layers * linear, layers * attention


def test_flops_per_sample_match_a_hand_count():
    """FLOPs counted over a real forward + backward match a hand count: each linear 2*M*N*K forward and twice that
    backward; the patch embedding's backward only for its weight (pixels need no gradient); attention's backward
    five matmuls (scores recomputed, as fused kernels do and torch's counter counts), its forward two."""
    cfg = from_dict({"model": {"kind": "clip", "embed_dim": 32,
                               "image": {"name": "vit_tiny_patch16_224", "image_size": 32,
                                         "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}},
                               "text": {"context_length": 16, "width": 32, "layers": 2, "heads": 2}},
                     "train": {"batch_size": 64}})
    meas = P.measure(cfg)
    image_linear, image_attention = transformer_hand_count((32 // 8) ** 2 + 1, 64, 2)  # 16 patches + class token
    text_linear, text_attention = transformer_hand_count(16, 32, 2)
    projections = 2 * 64 * 32 + 2 * 32 * 32  # pooled image and text features to the 32-wide embedding
    patch_embed = 2 * (32 // 8) ** 2 * 64 * (3 * 8 * 8)
    linear, attention = image_linear + text_linear + projections, image_attention + text_attention
    expected = 3 * linear + 3.5 * attention + 2 * patch_embed
    print(f"counted {meas.flops_step.per_sample:.0f} FLOPs per sample, by hand {expected:.0f}")
    assert meas.flops_step.per_sample == pytest.approx(expected, rel=0.01)
    assert meas.flops_forward.per_sample == pytest.approx(linear + attention + patch_embed, rel=0.01)
    plan = P.make_plan(cfg, P.Target(), meas)
    assert plan["flops"]["per_sample_loss"] == 3 * 2 * 64 * 32  # ITC: 3 matmuls of (B, E) x (E, B), per sample


def test_loss_memory_matches_the_objective():
    """ITC over a whole (B, B) matrix keeps two float32 exponentials of it; tiled, two tiles."""
    from contrast.config import ClipLossConfig

    B, E = 512, 16
    cfg = from_dict({"loss": {"itc": 1.0, "tile_size": 0}})
    meas = P.Measured({}, 0, 0, 0, 0, E, 1, 0, *[P.Linear(0, 0)] * 7)
    img = torch.nn.functional.normalize(torch.randn(B, E), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(B, E), dim=1).requires_grad_()
    live = P.LiveBytes()
    with live:
        loss = info_nce(img, txt, torch.tensor(10.0), tile_size=0)
    held = live.peak([loss])
    assert P.loss_bytes(cfg, meas, B, 1) == pytest.approx(held, rel=0.05)
    assert isinstance(cfg.loss, ClipLossConfig)
    cfg.loss.tile_size = 128
    assert P.loss_bytes(cfg, meas, B, 1) == 2 * 128 * 128 * 4
    assert P.loss_bytes(cfg, meas, B, 4) == 2 * 128 * 128 * 4  # tiles bound it whatever the global batch


def budget_for(cfg, meas, setting, world: int = 1) -> P.Target:
    """A target whose memory is just enough for ``setting``."""
    total = P.memory(cfg, meas, P.Target(world=world), setting)["total"]
    return P.Target(memory_gib=total * 1.001 / P.GiB, world=world)


def test_advice_escalates_in_the_documented_order(big):
    """As memory shrinks: nothing, then micro_batch_size, then checkpointing, then FSDP (first for the state)."""
    _, cfg, meas = big
    assert P.advise(cfg, meas, P.Target(memory_gib=80)).overrides == []
    tight = P.advise(cfg, meas, budget_for(cfg, meas, P.Setting(32, False, False)))
    assert tight.overrides == ["train.micro_batch_size=32"] and tight.fits and not tight.notes
    no_room = P.memory(cfg, meas, P.Target(), P.Setting(1, False, False))["total"] * 0.999 / P.GiB
    ckpt = P.advise(cfg, meas, P.Target(memory_gib=no_room))
    assert ckpt.overrides[-1] == "train.grad_checkpointing=true" and ckpt.fits
    assert [o.split("=")[0] for o in ckpt.overrides] in (["train.grad_checkpointing"],
                                                         ["train.micro_batch_size", "train.grad_checkpointing"])
    state = (meas.weight_bytes + meas.grad_bytes + meas.adam_bytes) / P.GiB
    sharded = P.advise(cfg, meas, P.Target(memory_gib=state * 0.9, world=8))
    assert sharded.overrides[-1] == "train.fsdp=true" and sharded.fits
    one = P.advise(cfg, meas, P.Target(memory_gib=state * 0.9, world=1))
    assert not one.fits and any("train.fsdp=true over at least 2 devices" in n for n in one.notes)


def test_blip_never_gets_micro_batches_without_the_accumulation_note():
    """BLIP's ITM and LM terms are not exact under gradient caching: micro-batches come with accumulate=mean and the
    note, and only after checkpointing alone did not suffice."""
    cfg = load_recipe(ROOT / "recipes/blip_tiny.yaml")
    meas = P.measure(cfg)
    assert not P.cache_allowed(cfg)
    micro_seen = 0
    for gib in [0.001 * 1.25**k for k in range(40)]:
        advice = P.advise(cfg, meas, P.Target(memory_gib=gib, world=2))
        if any(o.startswith("train.micro_batch_size") for o in advice.overrides):
            micro_seen += 1
            assert P.ACCUMULATION_NOTE in advice.notes
            assert "train.accumulate=mean" in advice.overrides
            assert "train.grad_checkpointing=true" in advice.overrides
    assert micro_seen  # the sweep reached budgets that need micro-batches


def test_cli_json(capsys):
    assert main(["plan", "recipes/clip_tiny.yaml", "--memory", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"]["all"]["total"] > 1e6 and plan["batch"]["per_device"] == 64
    mem = plan["memory"]
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    assert plan["advice"]["fits_as_is"] and plan["advice"]["overrides"] == []
    assert plan["timing"]["images_per_second"] > 0
    text = P.format_plan(plan, "recipes/clip_tiny.yaml")
    assert "advice: it fits as written" in text and "AdamW state" in text


@pytest.mark.parametrize("args, words", [
    (["recipes/clip_tiny.yaml", "--set", "train.batch_sise=64"], ["batch_sise", "batch_size"]),
    (["recipes/clip_tiny.yaml", "--memory", "lots"], ["--memory", "e.g. --memory 80"]),
    (["recipes/clip_tiny.yaml", "--memory", "-3"], ["--memory", "greater than 0"]),
    (["recipes/clip_tiny.yaml", "--world", "0"], ["--world", "e.g. --world 8"]),
    (["recipes/clip_tinyy.yaml"], ["recipe not found", "recipes/clip_tiny.yaml"]),
], ids=["set-typo", "memory-word", "memory-negative", "world-zero", "missing-recipe"])
def test_cli_errors_are_one_line(capsys, args, words):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("contrast: error:")
    assert all(w in err for w in words), err
