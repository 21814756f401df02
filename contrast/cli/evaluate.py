"""``contrast eval ...`` commands: zeroshot, retrieval, linear-probe and all.

Each command writes one report (``report.json``, ``report.md`` and plots) into ``--out-dir``, by default
``RUN_DIR/eval/<command>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from contrast.cli.common import device
from contrast.cli.common import user_errors as _user_errors
from contrast.cli.generate import add_caption_eval
from contrast.data.transforms import build_transform
from contrast.runs import load, load_config_of, run_dir_of, tower_embedder

# the evaluators import torchmetrics (seconds): each command imports what it runs, so `contrast --help` stays quick


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(run config, model, preprocess, tokenizer) of ``--checkpoint``."""
    cfg, _ = load_config_of(args.checkpoint)
    model, preprocess, tokenizer = load(args.checkpoint, device=device(args.device))
    if not model.supports("embed"):  # a decoder run: its tower, with the text tower of the CLIP run it came from
        model, tokenizer = tower_embedder(cfg, model)
        preprocess = build_transform(cfg.model.image)
    return cfg, model, preprocess, tokenizer


def _print_skips(name: str, result: dict) -> None:
    """One line naming what bad samples a section left out (nothing when it left out none)."""
    from contrast.data.decode import Skips

    skips = Skips(result.get("skipped") or {})
    dropped = (("captions of skipped images left out", "captions_of_skipped_images"),
               ("images left without captions", "images_without_captions"))  # retrieval: pairs that went with them
    extra = [f"{result[key]} {what}" for what, key in dropped if result.get(key)]
    if skips or extra:
        print(f"{name}: {skips.summary()}" + "".join(f"; {e}" for e in extra))


def _write(args: argparse.Namespace, command: str, sections: list) -> None:
    from contrast.evaluate.report import write_report


    if args.out_dir:
        out = Path(args.out_dir)
    else:
        _, ckpt = load_config_of(args.checkpoint)
        out = run_dir_of(ckpt) / "eval" / command
    paths = write_report(out, sections, checkpoint=str(args.checkpoint), title=f"Evaluation report: {command}")
    print(f"report: {paths['markdown']}")


def _run_zeroshot(args, cfg, model, preprocess, tokenizer) -> list:
    from contrast.evaluate.report import Section
    from contrast.evaluate.zeroshot import evaluate_zeroshot, load_task


    sections = []
    for task_path in args.task:
        with _user_errors():
            task = load_task(task_path, args.task_data)
            r = evaluate_zeroshot(model, preprocess, tokenizer, task, data_cfg=cfg.data,
                                  image_size=cfg.model.image.image_size, batch_size=args.batch_size,
                                  device=device(args.device))
        sections.append(Section("zeroshot", r["task"], r))
        print(f"{r['task']}: top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  mean per-class recall "
              f"{r['mean_per_class_recall']:.3f}  (n={r['n']}, chance {r['chance_top1']:.3f}; split {r['split']})")
        _print_skips(r["task"], r)
    return sections


def _zeroshot(args: argparse.Namespace) -> int:
    cfg, model, preprocess, tokenizer = _setup(args)
    sections = _run_zeroshot(args, cfg, model, preprocess, tokenizer)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([s.result for s in sections], indent=2))
    _write(args, "zeroshot", sections)
    return 0


def _retrieval_tasks(args, cfg) -> list:
    """The retrieval tasks to run: ``--retrieval-task`` files, else one built from ``--data`` (default: the run's)."""
    from contrast.evaluate.tasks import RetrievalTask, load_retrieval_task

    files = getattr(args, "retrieval_task", None) or []
    if files:
        return [load_retrieval_task(f, args.data) for f in files]
    source = args.data or cfg.data.source
    return [RetrievalTask(name=f"{Path(source).name or source}:{args.split or cfg.data.eval_split}", data=source,
                          split=args.split or cfg.data.eval_split, images=args.images, max_captions=args.max_captions,
                          image_column=args.image_column, caption_column=args.caption_column,
                          group_by=args.group_by, limit=args.limit or 0)]


def _print_retrieval(name: str, r: dict, rerank_itm: int) -> None:
    print(f"{name}: {r['num_images']} images, {r['num_texts']} captions")
    for direction in ("image_to_text", "text_to_image"):
        m = r[direction]
        print(f"  {direction}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("R@")))
        if "itm_reranked" in r:
            m = r["itm_reranked"][direction]
            print(f"  {direction} (ITM re-ranked top {rerank_itm}): "
                  + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("R@")))
    print(f"  ({r['definition']})")
    _print_skips(name, r)


def _run_retrieval(args, cfg, model, preprocess, tokenizer) -> list:
    from contrast.data.decode import SampleReader
    from contrast.evaluate.report import Section
    from contrast.evaluate.retrieval import evaluate_retrieval
    from contrast.evaluate.tasks import retrieval_dataset

    sections = []
    with _user_errors():
        tasks = _retrieval_tasks(args, cfg)
    for task in tasks:
        data_cfg = cfg.data if task.data == "synthetic" else dataclasses.replace(cfg.data, source=task.data)
        with _user_errors():
            r = _stream_retrieval(args, task, data_cfg, model, preprocess, tokenizer)
            if r is None:
                ds = retrieval_dataset(task, cfg.data, cfg.model.image.image_size)
                r = evaluate_retrieval(model, preprocess, tokenizer, ds, group_by=task.group_by,
                                       rerank_itm=args.rerank_itm, batch_size=args.batch_size,
                                       device=device(args.device), reader=SampleReader.of(data_cfg))
        r.update(data=task.data, split=task.split)
        _print_retrieval(task.name, r, args.rerank_itm)
        sections.append(Section("retrieval", task.name, r))
    return sections


def _stream_retrieval(args, task, data_cfg, model, preprocess, tokenizer) -> dict | None:
    """Retrieval on the webdataset shards of the task's split, streamed (None when its data is not shards)."""
    from contrast.data.decode import SampleReader
    from contrast.data.sources import captions_per_line, shard_units
    from contrast.errors import UserError
    from contrast.evaluate.retrieval import evaluate_retrieval_stream

    if task.data == "synthetic" or (not Path(task.data).expanduser().exists() and "{" not in task.data):
        return None
    units = shard_units(data_cfg, task.split)
    if units is None:
        return None
    if args.rerank_itm or task.group_by:
        raise UserError(f"{task.data} holds webdataset shards, read as a stream with one image per sample: drop "
                        "--rerank-itm and --group-by for them")
    rows = (row for unit in units for row in unit.rows(0, 1))
    return evaluate_retrieval_stream(model, preprocess, tokenizer, rows, limit=task.limit, batch_size=args.batch_size,
                                     device=device(args.device), reader=SampleReader.of(data_cfg),
                                     split_lines=captions_per_line(data_cfg))


def _retrieval(args: argparse.Namespace) -> int:
    if not args.data and not args.retrieval_task:
        from contrast.errors import UserError

        raise UserError("contrast eval retrieval needs --data SOURCE or --retrieval-task FILE (e.g. "
                        "eval/tasks/coco_karpathy.yaml)")
    _write(args, "retrieval", _run_retrieval(args, *_setup(args)))
    return 0


def _run_probe(args, cfg, model, preprocess, tokenizer) -> list:
    from contrast.data.decode import SampleReader
    from contrast.evaluate.linear_probe import DEFAULT_L2_GRID, evaluate_linear_probe
    from contrast.evaluate.report import Section
    from contrast.evaluate.zeroshot import load_task, task_dataset


    sections = []
    for task_path in args.task:
        with _user_errors():
            task = load_task(task_path, args.task_data)
            splits = {}
            for role, split in (("train", task.train_split), ("val", task.val_split), ("test", task.split)):
                if split is None:
                    continue
                ds = task_dataset(dataclasses.replace(task, split=split), cfg.data, cfg.model.image.image_size)
                if role == "train" and args.max_train and len(ds) > args.max_train:
                    ds = ds.shuffle(seed=0).select(range(args.max_train))
                splits[role] = ds
            r = evaluate_linear_probe(
                model, preprocess, splits["train"], splits["test"], splits.get("val"),
                label_column=task.label_column, image_column=task.image_column, classnames=task.classnames,
                features=args.features, l2_grid=args.l2 or DEFAULT_L2_GRID, batch_size=args.batch_size,
                device=device(args.device), reader=SampleReader.of(cfg.data),
            )
        r["task"] = task.name
        sections.append(Section("linear_probe", task.name, r))
        print(f"{task.name}: linear probe test accuracy {r['test_accuracy']:.3f} at L2 {r['best_l2']:.3g} "
              f"(val {r['val_accuracy']:.3f}; {r['num_train']} train / {r['num_val']} val / {r['num_test']} test, "
              f"{r['features']} features of width {r['feature_dim']})")
        _print_skips(task.name, r)
    return sections


def _linear_probe(args: argparse.Namespace) -> int:
    _write(args, "linear-probe", _run_probe(args, *_setup(args)))
    return 0


def _all(args: argparse.Namespace) -> int:
    setup = _setup(args)
    sections = _run_zeroshot(args, *setup)
    if not args.no_probe:
        sections += _run_probe(args, *setup)
    if not args.no_retrieval:
        sections += _run_retrieval(args, *setup)
    _write(args, "all", sections)
    return 0


def _common(p: argparse.ArgumentParser, batch_size: int = 256) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    p.add_argument("--out-dir", help="write report.json, report.md and plots here (default RUN_DIR/eval/COMMAND)")


def _retrieval_args(p: argparse.ArgumentParser, data_required: bool) -> None:
    p.add_argument("--data", help="synthetic, a Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json), a "
                   "folder with captions.jsonl/csv, a .parquet/.arrow file, a save_to_disk folder, or webdataset "
                   "shards (a folder with train/val/test subfolders of .tar, streamed; a folder of .tar without them "
                   "with --split all)"
                   + (" (or give --retrieval-task)" if data_required else " (default: the run's data source)"))
    p.add_argument("--retrieval-task", nargs="+", metavar="TASK",
                   help="retrieval task file(s), e.g. eval/tasks/coco_karpathy.yaml (--data replaces their data)")
    p.add_argument("--split", help="train | val | test | all (Karpathy JSON: also restval; default: the run's "
                   "data.eval_split)")
    p.add_argument("--images", help="Karpathy JSON: the folder its image paths are relative to (default: its folder)")
    p.add_argument("--max-captions", type=int, default=5,
                   help="Karpathy JSON: captions kept per image (default 5, the protocol's; 0 keeps all)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption", help="a string column, or a list-of-strings column")
    p.add_argument("--group-by", help="column naming each caption's image (default: image_id when present, else "
                   "the image file path)")
    p.add_argument("--rerank-itm", type=int, default=0, metavar="K",
                   help="re-rank each query's top K by the model's image-text matching head")
    p.add_argument("--limit", type=int, help="evaluate only the first N rows")


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", choices=["pooled", "embed"], default="pooled",
                   help="pooled: the image tower's output before the projection; embed: the projected embedding")
    p.add_argument("--l2", type=float, nargs="+", help="L2 strengths to sweep (default 1e-6 ... 1e2)")
    p.add_argument("--max-train", type=int, help="fit on at most N training images (a seeded sample)")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    z = ev.add_parser("zeroshot", help="zero-shot classification on task files")
    _common(z)
    z.add_argument("--task", required=True, nargs="+", help="task file(s), e.g. eval/tasks/shapes.yaml")
    z.add_argument("--out", help="also write the results as a JSON list here")
    z.add_argument("--task-data", help="use this data folder for the task(s) instead of their data:")
    z.set_defaults(func=_zeroshot)

    r = ev.add_parser("retrieval", help="image-text retrieval recall@1/5/10 in both directions")
    _common(r, batch_size=64)
    _retrieval_args(r, data_required=True)
    r.set_defaults(func=_retrieval)

    lp = ev.add_parser("linear-probe", help="logistic regression on frozen image features, per task file")
    _common(lp, batch_size=64)
    lp.add_argument("--task", required=True, nargs="+", help="task file(s); train_split / val_split / split")
    lp.add_argument("--task-data", help="use this data folder for the task(s) instead of their data:")
    _probe_args(lp)
    lp.set_defaults(func=_linear_probe)

    a = ev.add_parser("all", help="zero-shot and linear probe on task files plus retrieval, in one report")
    _common(a, batch_size=64)
    a.add_argument("--task", required=True, nargs="+", help="task file(s), e.g. eval/tasks/shapes.yaml")
    a.add_argument("--task-data", help="use this data folder for the zero-shot task(s) instead of their data:")
    _probe_args(a)
    _retrieval_args(a, data_required=False)
    a.add_argument("--no-probe", action="store_true", help="skip the linear probes")
    a.add_argument("--no-retrieval", action="store_true", help="skip retrieval")
    a.set_defaults(func=_all)

    add_caption_eval(ev)
