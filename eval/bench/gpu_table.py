"""The one markdown table of ``eval/bench/gpu_check.sh``, from what its stages left in its work folder.

    python eval/bench/gpu_table.py WORK_DIR OUT.md

WORK_DIR holds ``stages`` (one ``name exit-code seconds`` line per stage), ``tests.xml`` (pytest's JUnit report of
the ``cuda`` tests), ``throughput.json`` (train_throughput.py --json), ``loss.json`` (loss.py --json) and ``run/``
(the ViT-B/16 recipe's run directory, its ``metrics.jsonl``). A stage that failed or left nothing is a row saying so.
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _stages(work: Path) -> dict[str, tuple[int, int]]:
    path = work / "stages"
    lines = path.read_text().split("\n") if path.is_file() else []
    return {n: (int(rc), int(s)) for n, rc, s in (line.split() for line in lines if line.strip())}


def _status(stages: dict, name: str) -> str:
    if name not in stages:
        return "not run"
    rc, seconds = stages[name]
    verdict = "ok" if rc == 0 else ("timed out" if rc in (124, 137) else f"exit {rc}")
    return f"{verdict}, {seconds} s"


def test_rows(work: Path, stages: dict) -> list[tuple[str, str, str]]:
    xml = work / "tests.xml"
    if not xml.is_file():
        return [("cuda tests", "tests/test_cuda.py", f"no report ({_status(stages, 'tests')})")]
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    passed = len(cases) - len(failed) - skipped
    result = f"{passed} passed, {len(failed)} failed, {skipped} skipped"
    result += f" (failed: {', '.join(failed)})" if failed else ""
    return [("cuda tests", "pytest -m cuda tests/test_cuda.py", f"{result}; {_status(stages, 'tests')}")]


def throughput_rows(work: Path, stages: dict) -> list[tuple[str, str, str]]:
    path = work / "throughput.json"
    if not path.is_file():
        return [("train throughput", "ViT-B/16", f"no results ({_status(stages, 'throughput')})")]
    t = json.loads(path.read_text())
    rows, by = [], {r["impl"]: r for r in t["rows"]}
    for r in t["rows"]:
        mfu = 100 * r["flop_per_s"] / t["peak_flop_per_s"]
        rows.append((f"train {r['impl']}", f"{t['size']}, batch {t['batch']}",
                     f"{r['images_per_s']:,.0f} images/s, MFU {mfu:.1f}%, peak {r['peak_rss_mib'] / 1024:.1f} GiB"))
    base = by.get("open_clip bf16")
    for impl, r in by.items():
        if base is not None and impl.startswith("contrast") and "bf16" in impl:
            rows.append((f"{impl} / open_clip bf16", "images/s", f"{r['images_per_s'] / base['images_per_s']:.2f}x"))
    rows.append(("MFU peak", "", t["peak"]))
    return rows


def loss_rows(work: Path, stages: dict) -> list[tuple[str, str, str]]:
    path = work / "loss.json"
    if not path.is_file():
        return [("contrastive loss", "B=65,536", f"no results ({_status(stages, 'loss')})")]
    res = json.loads(path.read_text())
    rows = []
    for r in res["table"]:
        parts = [f"{impl} {r[impl]['best_s'] * 1e3:.1f} ms, {r[impl]['peak_mib']:,.0f} MiB"
                 for impl in ("contrast", "contrast-whole", "open_clip") if impl in r]
        rows.append((f"loss {r['loss']} fwd+bwd", f"B={r['B']:,}, {res['precision']}", "; ".join(parts)))
    for r in res["big"]:
        rows.append((f"loss {r['loss']} fwd+bwd, contrast only", f"B={r['B']:,}, tile_size {res['tile_size']}",
                     f"{r['seconds'] * 1e3:.0f} ms, {r['peak_mib']:,.0f} MiB extra"))
    return rows


def recipe_rows(work: Path, stages: dict) -> list[tuple[str, str, str]]:
    path = work / "run" / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    steps = [r for r in recs if "loss" in r and "images_per_s" in r]
    if not steps:
        return [("recipe clip_vitb16_gpu", "ViT-B/16, bf16", f"no logged steps ({_status(stages, 'recipe')})")]
    later = [r["images_per_s"] for r in steps[1:]] or [steps[0]["images_per_s"]]  # the first log includes warm-up
    return [("recipe clip_vitb16_gpu", f"{steps[-1]['step']} steps, bf16, synthetic 224 px",
             f"loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, {statistics.median(later):,.0f} images/s "
             f"(median of logged steps after the first, data loading included); {_status(stages, 'recipe')}")]


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    stages = _stages(work)
    head = (work / "device").read_text().strip() if (work / "device").is_file() else "unknown device"
    rows = test_rows(work, stages) + throughput_rows(work, stages) + loss_rows(work, stages) + recipe_rows(work, stages)
    rows += [("stage " + name, "", _status(stages, name)) for name in stages]
    text = "\n".join([f"GPU check on {head}", "", "| check | setting | result |", "|---|---|---|"]
                     + [f"| {a} | {b} | {c} |" for a, b, c in rows]) + "\n"
    out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
