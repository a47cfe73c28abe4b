"""Text for calibration and perplexity, as a stream of token ids read a chunk at a time.

The built-in sample is Python's own documentation prose (pydoc_data.topics): real English that
every Python install carries, so calibrating needs no download.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from catsgen.errors import UserError

CHUNK_CHARS = 1 << 16  # text is read and tokenized this much at a time: memory stays bounded


@dataclass
class TextSource:
    name: str
    bytes: int
    chunks: Callable[[], Iterator[str]]

    def record(self) -> dict:
        return {"name": self.name, "bytes": self.bytes}


def builtin_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def builtin_source() -> TextSource:
    text = builtin_text()
    name = f"pydoc_data.topics (Python {platform.python_version()} documentation)"
    return TextSource(name, len(text.encode()), lambda: iter([text]))


def file_source(path: Path) -> TextSource:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--text {path} is a directory, not a text file")
    if not path.is_file():
        raise UserError(f"--text {path}: no such file")
    return TextSource(path.name, path.stat().st_size, lambda: _file_chunks(path))


def text_sources(paths: Iterable[Path] | None) -> list[TextSource]:
    """The given files, or the built-in sample when there are none."""
    paths = list(paths or [])
    return [file_source(p) for p in paths] if paths else [builtin_source()]


def _file_chunks(path: Path) -> Iterator[str]:
    """CHUNK_CHARS at a time, each ending after a newline (else a space) so that no word is cut."""
    carry = ""
    try:
        with open(path, encoding="utf-8") as f:
            while block := f.read(CHUNK_CHARS):
                text = carry + block
                cut = (text.rfind("\n") + 1) or (text.rfind(" ") + 1) or len(text)
                carry = text[cut:]
                yield text[:cut]
    except UnicodeDecodeError as e:
        raise UserError(f"--text {path} is not UTF-8 text ({e.reason})") from None
    if carry:
        yield carry


# Calibration interleaves several texts in turns of this many tokens (a third of a 512-token
# window): the statistics and the fisher tokens, which may cover only the start of the stream,
# then see every text. Measured across four texts, such a mix calibrated better than each text
# alone and than turns of 512 tokens (docs/cats.md, "Mixed calibration text").
MIX_TURN_TOKENS = 171


def token_stream(sources: list[TextSource], tokenizer, turn: int | None = None) -> Iterator[list[int]]:
    """Token ids of the sources, without special tokens: one after the other, or with `turn`,
    round-robin turns of that many tokens of each (a source that runs out drops out)."""
    streams = [_source_tokens(source, tokenizer) for source in sources]
    if turn is None or len(streams) == 1:
        for stream in streams:
            yield from stream
        return
    buffers = [[] for _ in streams]
    live = list(range(len(streams)))
    while live:
        for i in list(live):
            while len(buffers[i]) < turn and (ids := next(streams[i], None)) is not None:
                buffers[i].extend(ids)
            if not buffers[i]:
                live.remove(i)
                continue
            yield buffers[i][:turn]
            del buffers[i][:turn]


def _source_tokens(source: TextSource, tokenizer) -> Iterator[list[int]]:
    for chunk in source.chunks():
        yield tokenizer.encode(chunk, add_special_tokens=False)


def windows(stream: Iterable[list[int]], seq_len: int, max_tokens: int) -> Iterator[list[int]]:
    """Consecutive non-overlapping windows of seq_len ids, max_tokens in all; the last window is
    shorter when the text or max_tokens ends inside it."""
    buffer, taken = [], 0
    for ids in stream:
        buffer.extend(ids)
        while len(buffer) >= seq_len and taken < max_tokens:
            n = min(seq_len, max_tokens - taken)
            yield buffer[:n]
            del buffer[:n]
            taken += n
        if taken >= max_tokens:
            return
    if buffer:
        yield buffer[:max_tokens - taken]
