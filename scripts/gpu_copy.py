"""The device-to-device copy bandwidth (bytes read + written), the ceiling bench.py's GB/s is
compared with: a 4 GiB bf16 buffer copied 20 times, CUDA events, after 3 warm-up copies.
    python3 scripts/gpu_copy.py"""
import torch

n = 2 * 2**30  # bf16 elements: 4 GiB a buffer
src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    dst.copy_(src)
end.record()
end.synchronize()
seconds = start.elapsed_time(end) / 1e3 / 20
print(f"{torch.cuda.get_device_name()}: copy {2 * src.nbytes / seconds / 1e9:.0f} GB/s (read + written, 4 GiB)")
