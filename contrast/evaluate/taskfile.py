"""Reading task files and the text files they name, safely: UTF-8 only, ``yaml.safe_load`` semantics (no Python
objects, no code run), and a bound on how far anchors and aliases may expand.

Class names and templates may be written out in the task file or named by reference, resolved at load time from an
installed package instead of being copied into the repository:

- ``open_clip:imagenet`` (class names): the 1,000 ImageNet-1k class names open_clip ships;
- ``open_clip:openai_imagenet`` / ``open_clip:simple_imagenet`` (templates): the 80 OpenAI ImageNet templates and
  the 7-template subset open_clip ships;
- ``clip_benchmark:NAME`` (class names or templates): the English lists that the ``clip-benchmark`` package ships
  for the data set NAME (e.g. ``clip_benchmark:cifar10`` templates), when that package is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contrast.config import ConfigError
from contrast.config import read_text as config_read_text
from contrast.config import read_yaml as config_read_yaml


class TaskFileError(ConfigError):
    """A task file (or a text file a task names) that cannot be read safely."""


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of ``path``, which must be UTF-8 (see :func:`contrast.config.read_text`)."""
    try:
        return config_read_text(path, what)
    except ConfigError as e:
        raise TaskFileError(str(e)) from None


def read_yaml(path: str | Path, what: str = "task file") -> Any:
    """A YAML document read safely (see :func:`contrast.config.read_yaml`: UTF-8, plain types only, a bound on how
    far anchors and aliases expand)."""
    p = Path(path).expanduser()
    try:
        return config_read_yaml(p, what)
    except ConfigError as e:
        raise TaskFileError(" ".join(str(e).split())) from None


# --------------------------------------------------------------------------------------------------- references


def _open_clip_list(name: str, kind: str) -> list[str]:
    from open_clip import zero_shot_metadata as meta

    if kind == "classnames" and name == "imagenet":
        return list(meta.IMAGENET_CLASSNAMES)
    templates = {"openai_imagenet": meta.OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": meta.SIMPLE_IMAGENET_TEMPLATES}
    if kind == "templates" and name in templates:
        return [t("{}") for t in templates[name]]  # open_clip's templates are functions of the class name
    known = "imagenet" if kind == "classnames" else "openai_imagenet, simple_imagenet"
    raise TaskFileError(f"open_clip ships no {kind} named '{name}'; choose one of: {known}")


def _clip_benchmark_list(name: str, kind: str) -> list[str]:
    try:
        import clip_benchmark.datasets as cb
    except ImportError:
        raise TaskFileError(
            f"{kind} 'clip_benchmark:{name}' need the clip-benchmark package; `pip install clip-benchmark`, or list "
            f"the {kind} in the task file"
        ) from None
    file = "en_classnames.json" if kind == "classnames" else "en_zeroshot_classification_templates.json"
    table = json.loads((Path(cb.__file__).parent / file).read_text(encoding="utf-8"))
    if name not in table:
        raise TaskFileError(f"clip-benchmark ships no {kind} for '{name}'; it has: {', '.join(sorted(table))}")
    return [str(v).replace("{c}", "{}") for v in table[name]]


def resolve_list(value: Any, kind: str, where: str) -> list[str]:
    """``value`` (a list, or a ``package:name`` reference) as a list of strings; ``kind`` is classnames or
    templates. CLIP_benchmark's ``{c}`` placeholder is accepted as ours, ``{}``."""
    if isinstance(value, str):
        package, sep, name = value.partition(":")
        if not sep:
            raise TaskFileError(f"{where}: {kind} must be a list or a reference such as 'open_clip:imagenet', "
                                f"got '{value}'")
        if package == "open_clip":
            return _open_clip_list(name, kind)
        if package == "clip_benchmark":
            return _clip_benchmark_list(name, kind)
        raise TaskFileError(f"{where}: unknown {kind} reference '{value}'; use open_clip:NAME or clip_benchmark:NAME")
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise TaskFileError(f"{where}: {kind} must be a list of strings")
    return [str(v).replace("{c}", "{}") for v in value]


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (classnames.txt, zeroshot_classification_templates.txt)."""
    return [s.strip() for s in read_text(path, what).splitlines() if s.strip()]
