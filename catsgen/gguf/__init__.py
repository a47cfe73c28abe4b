"""GGUF (llama.cpp) -> Hugging Face checkpoint directory, for Llama-architecture models.

The engine only loads HF-layout directories; this turns a GGUF into one:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json.
Quantized tensors are dequantized with the `gguf` package, so the written weights are exactly
the values llama.cpp computes with (not the original unquantized model).

reader.py: the file's metadata and tensors (HF names, dequantized, q/k rows un-permuted);
hf_config.py: config.json and generation_config.json; tokenizer.py: the tokenizer files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from catsgen.files import write_directory_atomically
from catsgen.gguf.hf_config import generation_config, hf_config
from catsgen.gguf.reader import ROPE_FREQS, hf_shapes, hf_weights, open_gguf, read_tensor
from catsgen.gguf.tokenizer import build_tokenizer, tokenizer_config

logger = logging.getLogger("catsgen")

# Bump when the written directory changes, so cached conversions (default_model.py) are redone.
CONVERTER_VERSION = 1


def convert_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32,
                 overwrite: bool = False) -> Path:
    """Convert a Llama-architecture GGUF into an HF-layout directory; returns out_dir.

    A few one-line messages go to the `catsgen` logger. overwrite replaces a non-empty out_dir
    (otherwise that is a UserError). Weights are written in `dtype`. Everything that can be wrong
    with the file is found before the slow part (dequantizing), and a failure or an interrupt
    (Ctrl-C, SIGTERM) leaves out_dir as it was.
    """
    from safetensors.torch import save_file

    path, out_dir = Path(gguf_path), Path(out_dir)
    reader, meta = open_gguf(path)
    shapes = hf_shapes(path, reader, meta)
    rope_freqs = next((read_tensor(t).numpy() for t in reader.tensors if t.name == ROPE_FREQS), None)
    config = hf_config(path, meta, shapes, rope_freqs, dtype,
                       converted_from={"gguf": path.name, "converter_version": CONVERTER_VERSION})
    tokenizer = build_tokenizer(path, meta)  # before the slow part: an unsupported tokenizer fails fast

    def write(tmp: Path) -> None:
        weights = {}
        for done, (name, w) in enumerate(hf_weights(reader, config["num_attention_heads"],
                                                    config["num_key_value_heads"]), 1):
            weights[name] = w.to(dtype).contiguous()
            if done % max(1, len(shapes) // 4) == 0 or done == len(shapes):
                logger.info(f"{path.name}: dequantized {done}/{len(shapes)} tensors")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, content in (("config.json", config), ("generation_config.json", generation_config(meta)),
                              ("tokenizer_config.json", tokenizer_config(meta))):
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")

    logger.info(f"converting {path} ({len(reader.tensors)} tensors) to {out_dir}")
    write_directory_atomically(out_dir, write, overwrite)
    return out_dir
