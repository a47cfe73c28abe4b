"""Programmatic dependent launch (PDL, compute capability 9.0+) for the decode kernels.

A kernel launched with PDL may be scheduled while the kernel before it in the stream still runs:
its programs take free slots and wait (after_previous_kernel) until that kernel has finished and
its writes are visible. Each of our kernels, once past that wait, lets the next kernel be
scheduled the same way (launch_dependents), so its launch and start-up overlap this one's run and
drain. CUDA graphs keep these edges. CATSGEN_PDL=0 launches the plain way (for A/B timings).
"""
import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_options(device) -> dict:
    """The launch keywords: USE_GDC for the kernel's wait, launch_pdl for the launch itself."""
    on = os.environ.get("CATSGEN_PDL", "1") != "0" and _capable(torch.device(device))
    return dict(USE_GDC=True, launch_pdl=True) if on else dict(USE_GDC=False)


@triton.jit
def after_previous_kernel(USE_GDC: tl.constexpr):
    """A kernel's first statement: nothing before it may read what the previous kernel writes.
    Then the next kernel may be scheduled. A no-op without PDL."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
