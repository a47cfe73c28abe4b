"""One tokenizer interface over `tokenizers` (tokenizer.json) and sentencepiece (tokenizer.model)."""

from __future__ import annotations

import json
from pathlib import Path

from catsgen.errors import UserError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, checkpoint_dir: str | Path):
        d = Path(checkpoint_dir)
        self.tokenizer_config = _read_json(d / "tokenizer_config.json")
        generation = _read_json(d / "generation_config.json")
        config = _read_json(d / "config.json")
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            self._hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
            self._sp = None
        elif (d / "tokenizer.model").is_file():
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
            self._hf = None
        else:
            raise UserError(f"{d} has no tokenizer.json or tokenizer.model")
        self.bos_id = self._special_id("bos_token", generation, config)
        self.eos_ids = self._eos_ids(generation, config)
        self.chat_template = self.tokenizer_config.get("chat_template")

    def _special_id(self, key, generation, config):
        text = _token_text(self.tokenizer_config.get(key))
        if text is not None and self.token_to_id(text) is not None:
            return self.token_to_id(text)
        value = generation.get(f"{key}_id", config.get(f"{key}_id"))
        return value[0] if isinstance(value, list) else value

    def _eos_ids(self, generation, config) -> set[int]:
        ids = set()
        for source in (generation.get("eos_token_id"), config.get("eos_token_id")):
            if source is not None:
                ids.update(source if isinstance(source, list) else [source])
        eos = self._special_id("eos_token", {}, {})
        if eos is not None:
            ids.add(eos)
        return ids

    def token_to_id(self, text: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(text)
        i = self._sp.piece_to_id(text)
        return None if i == self._sp.unk_id() and text != self._sp.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size() if self._hf is not None else self._sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._hf is not None:
            # tokenizer.json's post-processor decides about BOS (Llama-2/3 add it, SmolLM2 not).
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._sp.encode(text)
        if add_special_tokens and self.tokenizer_config.get("add_bos_token", True) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    def apply_chat_template(self, prompt: str) -> str:
        if not self.chat_template:
            raise UserError("--chat: this checkpoint's tokenizer_config.json has no chat_template")
        import jinja2
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        special = {k: _token_text(self.tokenizer_config.get(k)) or "" for k in ("bos_token", "eos_token")}
        return template.render(messages=[{"role": "user", "content": prompt}],
                               add_generation_prompt=True, **special)


class StreamDecoder:
    """Turns a growing list of token ids into printable text increments. Decoding the whole
    tail keeps byte-level BPE pieces and SentencePiece spaces right; an incomplete UTF-8
    sequence (U+FFFD at the end) is held back until the next token completes it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def flush(self) -> str:
        """Whatever was held back (the sequence ended inside a UTF-8 character)."""
        text = self.tokenizer.decode(self.ids)
        new, self.printed = text[len(self.printed):], text
        return new
