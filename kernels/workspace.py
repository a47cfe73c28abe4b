"""Zeroed int32 workspaces that kernels keep across calls: counters the launches of one call
leave at zero for the next, instead of a zeroed scratch per call (a memset launch saved).

So calls on one device must not overlap on two streams (the decode step runs on one). Create a
workspace before any CUDA-graph capture (prepare_workspaces, called when the caches are set up): torch.compile's
graphs warm up inside a private memory pool and refuse a tensor from it that outlives them."""
import torch

_workspaces: dict[tuple[str, torch.device], torch.Tensor] = {}


def int32_workspace(name: str, device, n: int) -> torch.Tensor:
    """The workspace `name` on `device`, at least n zeroed int32 on creation."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, device)
    if key not in _workspaces or _workspaces[key].numel() < n:
        _workspaces[key] = torch.zeros(n, device=device, dtype=torch.int32)
    return _workspaces[key]
