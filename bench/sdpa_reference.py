"""PyTorch fp16 scaled_dot_product_attention on the decode shapes of bench/attention.ts: the outside
reference of the attention benchmark, timed on the same device in the same device call.

    python3 bench/sdpa_reference.py OUT.json

One query token a sequence, K/V of `context` tokens, fp16, enable_gqa where query and KV heads differ.
Median over 7 repeats of 50 back-to-back calls timed with CUDA events (as kivi_cache_bench_attend).
PyTorch is a reference here only; kivi does not depend on it.
"""
import json
import sys

import torch
import torch.nn.functional as F

CASES = [  # (batch, context, query heads, kv heads, head dim): bench/attention.ts's cases
    (1, 4096, 32, 32, 128),
    (1, 32768, 32, 32, 128),
    (8, 8192, 32, 32, 128),
    (8, 32768, 32, 32, 128),
    (32, 4096, 32, 32, 128),
    (8, 32768, 32, 8, 128),
    (8, 32768, 32, 4, 128),
    (8, 32768, 28, 4, 128),
    (8, 32768, 14, 2, 64),
]


MULTI = [  # (batch, context, query heads, kv heads, head dim, query tokens): bench/attention.ts --multi
    (8, 32768, 32, 8, 128, 1),
    (8, 32768, 32, 8, 128, 8),
    (8, 32768, 32, 8, 128, 512),
]


def label(b, t, hq, hkv, d):
    s = f"{b}x{t}"
    if hq != hkv:
        s += f" GQA {hq}/{hkv}"
    if d != 128:
        s += f" D{d}"
    return s


def time_us(fn, iters=50, repeats=7):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / iters)
    return sorted(times)[len(times) // 2]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "sdpa.json"
    g = torch.Generator(device="cuda").manual_seed(1234)
    rows = []
    for b, t, hq, hkv, d in CASES:
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=g)
        gqa = hq != hkv
        us = time_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
        rows.append({"case": label(b, t, hq, hkv, d), "us": us})
        print(f"{label(b, t, hq, hkv, d):24s} torch fp16 SDPA {us:9.1f} us", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    for b, t, hq, hkv, d, n in MULTI:
        # n queries, the newest n of t tokens, causal: query i sees tokens 0 .. t - n + i (bottom-right)
        q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=g)
        mask = torch.ones(n, t, dtype=torch.bool, device="cuda").tril(diagonal=t - n)
        us = time_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        name = label(b, t, hq, hkv, d) + (f" chunk {n}" if n >= 64 else f" qlen {n}")
        rows.append({"case": name, "us": us})
        print(f"{name:32s} torch fp16 SDPA {us:9.1f} us", flush=True)
        del q, k, v, mask
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
