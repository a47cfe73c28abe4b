"""Programmatic dependent launch (PDL, compute capability 9.0+): a kernel launched with it is
scheduled as the kernel before it in the stream finishes, instead of after, and waits inside
(wait_for_previous_kernel) before it reads anything that kernel wrote. That hides a launch gap
per kernel boundary, CUDA graphs included. Set CATSGEN_PDL=0 to launch the plain way."""
import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _device_supports_pdl(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def use_pdl(device) -> bool:
    return os.environ.get("CATSGEN_PDL", "1") != "0" and _device_supports_pdl(torch.device(device))


@triton.jit
def wait_for_previous_kernel(USE_GDC: tl.constexpr):
    """The first statement of a kernel launched with PDL: nothing before it may read memory the
    previous kernel writes. A no-op when the kernel was launched the plain way."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
