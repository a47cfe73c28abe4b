"""tokenizer.json and tokenizer_config.json rebuilt from a GGUF file's tokenizer.ggml.* metadata.

Two vocabularies: GPT-2-style byte-level BPE (`gpt2`: SmolLM, Llama 3, with llama.cpp's named
pre-tokenizer regexes) and sentencepiece BPE (`llama`: Llama 2, Mistral), laid out as the models'
own tokenizer.json files are.
"""

from __future__ import annotations

from pathlib import Path

from catsgen.errors import UserError

# llama.cpp tokenizer.ggml.token_type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of llama.cpp's `tokenizer.ggml.pre` names, as in the models' own tokenizer.json.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"default", "gpt-2", "gpt2"}  # ByteLevel's own (GPT-2) regex
_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"}  # digits split one by one first
_SPLIT_PRE = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
              "tekken": _TEKKEN_SPLIT}


def _byte_level_tokenizer(path: Path, meta: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _GPT2_PRE:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGITS_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise UserError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    # llama.cpp looks a whole Llama-3 word up in the vocabulary before merging (its ignore_merges).
    model = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in _SPLIT_PRE)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece has the highest score. As a
    merge list: every split of a normal piece into two normal pieces, best-scoring piece first."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_tokenizer(meta: dict):
    """Llama-2/Mistral-style vocabulary, laid out as in their (legacy) tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE({t: i for i, t in enumerate(tokens)}, _sentencepiece_merges(tokens, scores, types),
                       unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # A space before each text run (also after a special token, as llama.cpp does), spaces as U+2581.
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if space_prefix else [])
                                          + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def build_tokenizer(path: Path, meta: dict):
    """tokenizer.json's content as a tokenizers.Tokenizer, ids as in the file."""
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level_tokenizer(path, meta)
    elif kind == "llama":
        tok = _sentencepiece_tokenizer(meta)
    else:
        raise UserError(f"{path}: tokenizer model {kind!r} is not supported "
                        "(only gpt2 byte-level BPE and llama sentencepiece)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    # Control tokens (<|im_start|>, <s>) and user-defined ones are matched whole in the text, before
    # any splitting. Each is in the vocabulary as spelled, so it keeps its id.
    added = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (UNKNOWN, CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for i, t in added if types[i] != USER_DEFINED])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for i, t in added if types[i] == USER_DEFINED])
    for i, t in added:
        if tok.token_to_id(t) != i:
            raise UserError(f"{path}: token {t!r} appears twice in the vocabulary; cannot build tokenizer.json")

    tok.post_processor = _post_processor(kind, meta, tokens)
    return tok


def _post_processor(kind: str, meta: dict, tokens: list[str]):
    """BOS/EOS around the text when the file asks for them (Llama-2/3 add BOS, SmolLM2 not)."""
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    prefix = [tokens[bos]] if _add_bos(meta) and bos is not None else []
    suffix = [tokens[eos]] if meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None else []
    if prefix or suffix:
        specials = {tokens[i]: i for i in (bos, eos) if i is not None and tokens[i] in prefix + suffix}
        steps.append(processors.TemplateProcessing(single=prefix + ["$A"] + suffix,
                                                   pair=prefix + ["$A"] + suffix + prefix + ["$B"] + suffix,
                                                   special_tokens=list(specials.items())))
    return steps[0] if len(steps) == 1 else processors.Sequence(steps) if steps else None


def _add_bos(meta: dict) -> bool:
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    return bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": _add_bos(meta),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
              "clean_up_tokenization_spaces": False,
              "model_max_length": int(meta.get("llama.context_length", 2048))}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{name}_token"] = tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
