"""Captions and prompts -> decoder inputs, with the decoder's own tokenizer and chat template.

A training sample is ``[prompt][answer]``: the prompt is the chat template's user turn (a configurable instruction
such as "Describe this image.") up to the assistant's generation prompt, the answer is the caption and the template's
end of turn; without a template the prompt is the start token and the instruction, the answer the caption and the
end token. The loss is taken on the answer's tokens only (``labels``: the token at each position, -100 elsewhere,
never pre-shifted: position t's logits predict ``labels[t + 1]``, as Hugging Face models shift them).

Where the image goes:
- ``prompt``: ``image_tokens`` placeholder positions at the image marker of the user turn (LLaVA), flagged in
  ``visual_mask``; the model writes its visual tokens there;
- ``prefix``: the placeholders before everything (BLIP-2's soft prompt before the templated text);
- ``none``: no placeholder (cross-attention); ``image_rows`` flags the positions from the token before the marker on
  (where Mllama has its image token), the text that may attend to the image (earlier positions are left as the bare
  LM computes them, as Mllama does).
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass

import torch

from contrast.errors import UserError

IMAGE_MARKER = "<image>"
PLACES = ("prompt", "prefix", "none")
CHAT_MODES = ("auto", "always", "never")


class PromptError(UserError, ValueError):
    """A prompt that cannot be built as configured (the message names why and the fix)."""


class Codec(abc.ABC):
    """The few things a prompt needs from a tokenizer: ``encode`` (no special tokens added), ``decode``, the start /
    end / pad ids, the ids of its special tokens and its chat template (None when it has none)."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    special_ids: frozenset[int]

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out."""

    def render(self, instruction: str, answer: str | None) -> str | None:
        """The chat template over one user turn (and the assistant's answer, or the generation prompt when None)."""
        return None


class HFCodec(Codec):
    """A Hugging Face tokenizer (``AutoTokenizer``)."""

    def __init__(self, tok, system: str | None = None):
        self.tok, self.system = tok, system
        self.bos_id = tok.bos_token_id if getattr(tok, "add_bos_token", True) is not False else None
        eos = tok.eos_token_id
        if eos is None:
            raise PromptError("the decoder's tokenizer has no end-of-sequence token; set eos_token in its "
                              "tokenizer_config.json")
        self.eos_id = int(eos)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else eos)
        self.special_ids = frozenset(int(i) for i in tok.all_special_ids)
        self.has_template = bool(getattr(tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def render(self, instruction: str, answer: str | None) -> str | None:
        if not self.has_template:
            return None
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": instruction}]
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)


class BPECodec(Codec):
    """The project's open_clip BPE (``ClipTokenizer``): start and end-of-text tokens, no chat template."""

    def __init__(self, clip_tokenizer):
        self.tok = clip_tokenizer
        self.bos_id, self.eos_id, self.pad_id = clip_tokenizer.sot_token_id, clip_tokenizer.eot_token_id, 0
        self.special_ids = frozenset({self.bos_id, self.eos_id})
        self.has_template = False

    def encode(self, text: str) -> list[int]:
        return list(self.tok._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    visual: list[bool]
    rows: list[bool]


class PromptTokenizer:
    """``tok(captions) -> {input_ids, attention_mask, labels, visual_mask, image_rows}`` (B, T), right-padded to the
    batch's longest sample; :meth:`prompts` gives left-padded generation prompts."""

    def __init__(self, codec: Codec, instruction: str = "", chat: str = "auto", image_tokens: int = 0,
                 image_at: str = "prompt", max_length: int = 64):
        if chat not in CHAT_MODES:
            raise PromptError(f"the decoder's chat must be one of {', '.join(CHAT_MODES)}, got '{chat}'")
        if image_at not in PLACES:
            raise PromptError(f"the image place must be one of {', '.join(PLACES)}, got '{image_at}'")
        if chat == "always" and not codec.has_template:
            raise PromptError("the recipe asks for the chat template (chat: always) but the decoder's tokenizer has "
                              "none; use a tokenizer with a chat_template in tokenizer_config.json, or set chat: never")
        self.codec, self.instruction = codec, instruction or ""
        self.chat = codec.has_template and chat != "never"
        self.image_tokens, self.image_at, self.max_length = int(image_tokens), image_at, int(max_length)
        if image_at != "none" and self.image_tokens < 1:
            raise PromptError(f"image place '{image_at}' needs at least one visual token, got {image_tokens}")

    # ------------------------------------------------------------------------------------------------- pieces
    def _prompt(self) -> Encoded:
        """The prompt's tokens (no loss), the image placeholders in place."""
        c, n = self.codec, self.image_tokens
        start = [] if self.chat or c.bos_id is None else [c.bos_id]  # a template writes its own start token
        if self.image_at == "prefix":  # the soft prompt before everything, then the whole text
            text = c.render(self.instruction, None) if self.chat else self.instruction
            ids = [c.pad_id] * n + start + c.encode(text)
            return Encoded(ids, [-100] * len(ids), [True] * n + [False] * (len(ids) - n), [True] * len(ids))
        user = self._user()
        before, _, after = (c.render(user, None) if self.chat else user).partition(IMAGE_MARKER)
        head, tail = start + c.encode(before), c.encode(after)
        n = n if self.image_at == "prompt" else 0
        ids = head + [c.pad_id] * n + tail
        seen = max(len(head) - 1, 0)  # the image is read from the token before its place on (Mllama's image token)
        return Encoded(ids, [-100] * len(ids), [False] * len(head) + [True] * n + [False] * len(tail),
                       [False] * seen + [True] * (len(ids) - seen))

    def _user(self) -> str:
        if self.image_at == "prefix":
            return self.instruction
        return f"{IMAGE_MARKER}\n{self.instruction}" if self.instruction else IMAGE_MARKER

    @functools.cached_property
    def _fixed(self) -> tuple[Encoded, str | None]:
        """The prompt's tokens and its rendered generation prompt: the same for every sample, made once."""
        return self._prompt(), (self.codec.render(self._user(), None) if self.chat else None)

    def _answer(self, caption: str) -> list[int]:
        c = self.codec
        if self.chat:
            prompt = self._fixed[1]
            full = c.render(self._user(), caption)
            if not full.startswith(prompt):
                raise PromptError("the decoder's chat template does not extend the generation prompt with the answer "
                                  "(its assistant turn differs from its generation prompt); set chat: never")
            ids = c.encode(full[len(prompt):])
            last = max((i for i, t in enumerate(ids) if t in c.special_ids), default=-1)
            return ids[: last + 1] if last >= 0 else ids + [c.eos_id]
        return c.encode(f" {caption}" if self.instruction else caption) + [c.eos_id]

    def encode(self, caption: str) -> Encoded:
        p = self._fixed[0]
        ans = self._answer(caption)
        room = self.max_length - len(p.ids)
        if room < 2:
            raise PromptError(f"the prompt takes {len(p.ids)} tokens (with {self.image_tokens} visual ones), leaving "
                              f"no room for a caption in the decoder's max_length {self.max_length}; raise it")
        ans = ans[:room]
        return Encoded(p.ids + ans, p.labels + ans, p.visual + [False] * len(ans), p.rows + [True] * len(ans))

    # ------------------------------------------------------------------------------------------------- batches
    def __call__(self, captions: str | list[str]) -> dict[str, torch.Tensor]:
        captions = [captions] if isinstance(captions, str) else list(captions)
        return self._pad([self.encode(c) for c in captions], left=False)

    def prompts(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` generation prompts (all alike here), ending where the answer starts."""
        return self._pad([self._fixed[0]] * n, left=True)

    def _pad(self, rows: list[Encoded], left: bool) -> dict[str, torch.Tensor]:
        T = max(len(r.ids) for r in rows)
        out = {k: torch.zeros(len(rows), T, dtype=torch.long) for k in ("input_ids", "attention_mask")}
        out["input_ids"].fill_(self.codec.pad_id)
        out["labels"] = torch.full((len(rows), T), -100, dtype=torch.long)
        out["visual_mask"] = torch.zeros(len(rows), T, dtype=torch.bool)
        out["image_rows"] = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            sl = slice(T - len(r.ids), T) if left else slice(0, len(r.ids))
            out["input_ids"][b, sl] = torch.tensor(r.ids)
            out["attention_mask"][b, sl] = 1
            out["labels"][b, sl] = torch.tensor(r.labels)
            out["visual_mask"][b, sl] = torch.tensor(r.visual)
            out["image_rows"][b, sl] = torch.tensor(r.rows)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.codec.decode(ids)
