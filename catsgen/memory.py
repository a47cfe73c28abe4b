"""Memory needs, checked before allocating: a KV cache for `--max-seq-len 100000000` or a preset
too big for the device is refused with one line, not a crash (or a swapping machine) mid-allocation."""

from __future__ import annotations

import os

from catsgen.errors import UserError

GiB = 2**30


def kv_cache_bytes(n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                   element_bytes: int) -> int:
    """Keys and values (2) of every layer, for every sequence and position."""
    return 2 * n_layers * batch_size * max_seq_len * n_kv_heads * head_dim * element_bytes


def available_bytes(device) -> int | None:
    """Free memory on the device: the GPU's free memory, or the machine's available memory on the
    CPU (MemAvailable counts reclaimable caches, unlike free pages); None when unknown."""
    device = str(device)
    if device.startswith("cuda"):
        import torch
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_fits(what: str, needed_bytes: int, device, hint: str = ""):
    free = available_bytes(device)
    if free is not None and needed_bytes > free:
        raise UserError(f"{what} needs {needed_bytes / GiB:.2f} GiB but only {free / GiB:.2f} GiB is free "
                        f"on {device}{hint}")
