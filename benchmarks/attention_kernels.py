"""Forward + backward time of the CPU attention kernels docs/speed.md and docs/architecture.md compare.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/attention_kernels.py

One torch thread, q/k/v of [8, 4, 512, 32] (batch, heads, sequence, head_dim), best of 7 after 2 untimed runs:
causal attention through `scaled_dot_product_attention` and through `MaterializedAttention` (two batched matmuls
around one compiled softmax), in fp32 and bf16; and the sliding-window blocks ([8·4, 16, 128, 32] queries against
640 keys, window 512, fp32) through SDPA with the 4-D band mask the model passes and with a 3-D one. Prints one
JSON object of milliseconds.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from cognate.model.layers import MaterializedAttention

SHAPE = (8, 4, 512, 32)
REPEATS, WARMUP = 7, 2


def best_ms(attention, dtype: torch.dtype, q_shape=SHAPE, kv_shape=SHAPE) -> float:
    torch.manual_seed(0)
    q = torch.randn(q_shape, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(kv_shape, dtype=dtype, requires_grad=True) for _ in range(2))
    times = []
    for _ in range(WARMUP + REPEATS):
        start = time.perf_counter()
        attention(q, k, v).float().sum().backward()
        times.append(time.perf_counter() - start)
    return round(1e3 * min(times[WARMUP:]), 1)


def main() -> dict:
    torch.set_num_threads(1)
    seq = SHAPE[2]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[f"sdpa_{name}_ms"] = best_ms(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), dtype
        )
        result[f"materialized_{name}_ms"] = best_ms(
            lambda q, k, v: MaterializedAttention.apply(q, k, v, causal), dtype
        )
    # The sliding window's blocks at 2,048 tokens: blocks of window / 4 = 128 queries, each against 640 keys.
    window, block, blocks = 512, 128, 16
    query, key = torch.arange(block)[:, None], torch.arange(window + block)[None, :]
    start = torch.arange(blocks)[:, None, None] * block
    band = (key > query) & (key <= query + window) & (key >= window - start)  # [blocks, block, span]
    q_shape = (SHAPE[0] * SHAPE[1], blocks, block, SHAPE[3])
    kv_shape = (SHAPE[0] * SHAPE[1], blocks, window + block, SHAPE[3])
    for name, mask in (("4d", band[None]), ("3d", band)):
        result[f"window_mask_{name}_fp32_ms"] = best_ms(
            lambda q, k, v, mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            torch.float32,
            q_shape,
            kv_shape,
        )
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
