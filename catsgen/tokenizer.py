"""One tokenizer interface over `tokenizers` (tokenizer.json) and sentencepiece (tokenizer.model)."""

from __future__ import annotations

from pathlib import Path

from catsgen.config import ModelConfig, read_json_object, read_text
from catsgen.errors import UserError


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _check_tokenizer_config(config: dict, path: Path):
    """The keys of tokenizer_config.json this module reads."""
    for key in ("bos_token", "eos_token"):
        if config.get(key) is not None and not isinstance(_token_text(config[key]), str):
            raise UserError(f"{path}: {key} must be a string or an object with a string 'content'")
    if not isinstance(config.get("add_bos_token", True), bool):
        raise UserError(f"{path}: add_bos_token must be true or false")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{path}: chat_template must be a string (or a list with a 'default' template)")
    return template


def _check_generation_ids(generation: dict, path: Path, vocab_size: int):
    for key in ("bos_token_id", "eos_token_id"):
        value = generation.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                         and 0 <= i < vocab_size for i in ids):
            raise UserError(f"{path}: {key} must be a token id or a list of token ids below "
                            f"config.json's vocab_size ({vocab_size}), not {value!r}")


def _load_tokenizers_json(path: Path):
    from tokenizers import Tokenizer as HFTokenizer
    text = read_text(path)
    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # the Rust library raises plain Exception for every malformed field
        raise UserError(f"{path} is not a valid tokenizer.json ({e})") from None


def _load_sentencepiece(path: Path):
    import sentencepiece
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{path} is not a valid sentencepiece model ({str(e).splitlines()[0]})") from None


class Tokenizer:
    def __init__(self, checkpoint_dir: str | Path):
        d = Path(checkpoint_dir)
        model_config = ModelConfig.from_checkpoint(d)
        self.tokenizer_config = _read_json(d / "tokenizer_config.json")
        self.chat_template = _check_tokenizer_config(self.tokenizer_config, d / "tokenizer_config.json")
        self.template_file = d / "tokenizer_config.json"
        if self.chat_template is None and (d / "chat_template.jinja").is_file():  # newer transformers save it apart
            self.template_file = d / "chat_template.jinja"
            self.chat_template = read_text(self.template_file)
        generation = _read_json(d / "generation_config.json")
        _check_generation_ids(generation, d / "generation_config.json", model_config.vocab_size)
        config = {"bos_token_id": model_config.bos_token_id, "eos_token_id": list(model_config.eos_token_ids)}
        if (d / "tokenizer.json").is_file():
            file, self._hf, self._sp = d / "tokenizer.json", _load_tokenizers_json(d / "tokenizer.json"), None
        elif (d / "tokenizer.model").is_file():
            file, self._hf, self._sp = d / "tokenizer.model", None, _load_sentencepiece(d / "tokenizer.model")
        else:
            raise UserError(f"{d} has no tokenizer.json or tokenizer.model")
        # An id past the embedding table would be an IndexError in the middle of a run.
        if self.max_id() >= model_config.vocab_size:
            raise UserError(f"{file} has token id {self.max_id()}, but config.json's vocab_size is "
                            f"{model_config.vocab_size}: tokenizer and model do not match")
        self.bos_id = self._special_id("bos_token", generation, config)
        self.eos_ids = self._eos_ids(generation, config)

    def max_id(self) -> int:
        if self._hf is not None:
            return max(self._hf.get_vocab(with_added_tokens=True).values(), default=-1)
        return self._sp.get_piece_size() - 1

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
            raise UserError("--chat: this checkpoint has no chat_template (in tokenizer_config.json "
                            "or chat_template.jinja)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):  # what transformers gives templates to refuse a conversation
            raise TemplateError(message)

        # Sandboxed, as in transformers: the template is code from the checkpoint's author.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = {k: _token_text(self.tokenizer_config.get(k)) or "" for k in ("bos_token", "eos_token")}
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, **special)
        except Exception as e:  # any error a template can raise (syntax, undefined, its own exceptions)
            raise UserError(f"--chat: the chat_template in {self.template_file} failed: "
                            f"{type(e).__name__}: {' '.join(str(e).split())}") from None


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
