"""Real image-caption pairs: Google's emoji set from the npm package ``emoji-datasource-google``.

The package holds 64x64 PNGs (``img/google/64/``) and ``emoji.json`` with each emoji's Unicode name, short names,
category and skin-tone variants. :func:`fetch_emoji` fetches it with npm into a cache folder and writes a
``datasets`` DatasetDict (``save_to_disk``) with splits train / val / test and columns:

- ``image``: the emoji composited on white, RGB PNG;
- ``caption``: the lower-cased Unicode name ("grinning face with smiling eyes"; flags read "flag of andorra"),
  with ", medium skin tone" etc. for a skin-tone variant; a name-less emoji falls back to its first short name;
- ``category`` / ``subcategory``: the emoji's Unicode group;
- ``emoji_id``: the base emoji's code points (e.g. ``1F385``), shared by its skin-tone variants;
- ``unified``: this image's own code points (``1F385-1F3FB`` for a variant).

Splits go by ``emoji_id`` through a hash of it, so they are stable across package versions and a skin-tone
variant always lands in the same split as its base emoji (near-duplicates never cross splits). With
``skin_tones="drop"`` the variants are left out. ``contrast.data.load_source`` reads the saved folder directly
(``data.source: ~/.cache/contrast/emoji``).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

PACKAGE = "emoji-datasource-google"
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
        "category": Value("string"),
        "subcategory": Value("string"),
        "emoji_id": Value("string"),
        "unified": Value("string"),
    }
)


class EmojiError(RuntimeError):
    """The emoji package cannot be fetched or read."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "contrast"


# --------------------------------------------------------------------------------------------------- fetching


def fetch_package(cache_dir: str | Path, npm: str = "npm") -> Path:
    """``npm pack`` the package into ``cache_dir`` and unpack it; returns the ``package`` folder (reused if present)."""
    cache = Path(cache_dir).expanduser()
    target = cache / PACKAGE
    if (target / "package" / "emoji.json").is_file():
        return target / "package"
    exe = shutil.which(npm)
    if exe is None:
        raise EmojiError(
            f"'{npm}' was not found; fetching {PACKAGE} needs Node's package manager. Install it "
            "(e.g. apt-get install npm, or from nodejs.org) and run the command again"
        )
    target.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [exe, "pack", PACKAGE, "--pack-destination", str(target), "--json"],
            capture_output=True, text=True, timeout=900, check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise EmojiError(f"npm pack {PACKAGE} timed out; check the connection to the npm registry") from e
    if proc.returncode != 0:
        raise EmojiError(f"npm pack {PACKAGE} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    tarballs = sorted(target.glob(f"{PACKAGE}-*.tgz"))
    if not tarballs:
        raise EmojiError(f"npm pack {PACKAGE} wrote no tarball into {target}")
    with tarfile.open(tarballs[-1]) as tar:
        tar.extractall(target, filter="data")
    tarballs[-1].unlink()
    if not (target / "package" / "emoji.json").is_file():
        raise EmojiError(f"the {PACKAGE} tarball holds no package/emoji.json; the package layout changed")
    return target / "package"


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


def _png_on_white(path: Path) -> bytes:
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def iter_rows(package_dir: Path, skin_tones: str = "keep") -> Iterator[dict]:
    """One row per image that exists in the package (base emoji first, then its variants)."""
    if skin_tones not in ("keep", "drop"):
        raise ValueError(f"skin_tones must be keep or drop, got '{skin_tones}'")
    meta = package_dir / "emoji.json"
    if not meta.is_file():
        raise EmojiError(f"{package_dir} holds no emoji.json; is it the unpacked {PACKAGE} package folder?")
    entries = json.loads(meta.read_text())
    images = package_dir / IMAGE_DIR
    for entry in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"])):
        emoji_id = entry["unified"]
        caption = base_caption(entry)
        items = [(entry, caption, emoji_id)]
        if skin_tones == "keep":
            for tone, var in sorted((entry.get("skin_variations") or {}).items()):
                items.append((var, variant_caption(caption, tone), var.get("unified", f"{emoji_id}-{tone}")))
        for item, text, unified in items:
            path = images / item["image"]
            if not item.get("has_img_google", True) or not path.is_file():
                continue
            yield {
                "image": {"bytes": _png_on_white(path), "path": None},
                "caption": text,
                "category": entry.get("category") or "",
                "subcategory": entry.get("subcategory") or "",
                "emoji_id": emoji_id,
                "unified": unified,
            }


def build_dataset(
    package_dir: str | Path,
    skin_tones: str = "keep",
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> DatasetDict:
    """The emoji DatasetDict (train / val / test split by emoji id) from an unpacked package folder."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in iter_rows(Path(package_dir), skin_tones):
        by_split[split_of(row["emoji_id"], fractions)].append(row)
    if not any(by_split.values()):
        raise EmojiError(f"no images found under {Path(package_dir) / IMAGE_DIR}")
    empty = {name: [] for name in FEATURES}
    return DatasetDict(
        {s: Dataset.from_list(rows, features=FEATURES) if rows else Dataset.from_dict(empty, features=FEATURES)
         for s, rows in by_split.items()}
    )


def fetch_emoji(
    cache_dir: str | Path | None = None,
    skin_tones: str = "keep",
    force: bool = False,
    npm: str = "npm",
) -> Path:
    """Fetch the package (if needed) and write the dataset to ``CACHE/emoji`` (or ``emoji-no-skin-tones``)."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = cache / ("emoji" if skin_tones == "keep" else "emoji-no-skin-tones")
    if (out / "dataset_dict.json").is_file() and not force:
        return out
    package_dir = fetch_package(cache, npm=npm)
    ds = build_dataset(package_dir, skin_tones)
    if out.exists():
        shutil.rmtree(out)
    ds.save_to_disk(str(out))
    return out


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
