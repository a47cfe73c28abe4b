# Run as-is for benchmarks/quality/int8_clipping.md (paths under /tmp/wtq: the stats file of int8_clipping_stats.py).
"""Mean x_j^2 per input channel of every decoder linear, float model, built-in calibration text
(the first 2048 tokens, 4 windows of 512: the same tokens the thresholds file was calibrated on)."""
import torch, torch.nn.functional as F
from pathlib import Path
from catsgen.checkpoint import load_model
from catsgen.default_model import default_checkpoint
from catsgen.tokenizer import Tokenizer
from catsgen.text_sample import MIX_TURN_TOKENS, text_sources, token_stream, windows
from catsgen.linear import normalized
ck = default_checkpoint()
tok = Tokenizer(ck); model = load_model(ck, dtype=torch.float32)
ids = next(windows(token_stream(text_sources([]), tok, MIX_TURN_TOKENS), 2048, 2048))
stats = {}
def acc(name, x):
    x = x.detach().float().reshape(-1, x.shape[-1])
    s = stats.setdefault(name, [torch.zeros(x.shape[1]), 0]); s[0] += x.square().sum(0); s[1] += x.shape[0]
for i, layer in enumerate(model.layers):
    p = f"layers.{i}."
    layer.attention.wqkv.register_forward_pre_hook(lambda m, a, p=p: acc(p + "attention.wqkv.weight", normalized(a[0])))
    layer.attention.wo.register_forward_pre_hook(lambda m, a, p=p: acc(p + "attention.wo.weight", a[0]))
    def ff(m, a, p=p):
        x = normalized(a[0]); acc(p + "feed_forward.w_gate", x); acc(p + "feed_forward.w_up", x)
        acc(p + "feed_forward.w_down_t", F.silu(x @ m.w_gate.t()) * (x @ m.w_up.t()))
    layer.feed_forward.register_forward_pre_hook(ff)
with torch.no_grad():
    for w in windows(iter([ids]), 512, len(ids)):
        model(torch.tensor([w]), head=False)
torch.save({k: s / n for k, (s, n) in stats.items()}, "/tmp/wtq/actstats.pt")
print(len(ids), len(stats), {k: (v[0] / v[1]).max().item() / (v[0] / v[1]).mean().item() for k, v in list(stats.items())[:5]})
