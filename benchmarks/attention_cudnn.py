"""Time PyTorch's scaled_dot_product_attention with the cuDNN backend at the MLA shapes
(q/k head dim 192, v head dim 128, causal, bf16), forward and backward, as the figure our
attention kernels are held against (benchmarks/RESULTS.md). Run on the GPU machine:

    python3 benchmarks/attention_cudnn.py

Prints one line per shape: forward ms and backward ms (median of 20 after 5 warm-up calls,
CUDA events), and which backends were available.
"""
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def bench(B, T, H, dk, dv, backend):
    torch.manual_seed(0)
    q = torch.randn(B, H, T, dk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, H, T, dk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, H, T, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        g = torch.randn_like(out)
        fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        bwd_total = time_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                                        (q, k, v), g))
    return fwd, bwd_total - fwd


def main():
    warnings.filterwarnings("ignore")  # PyTorch explains at length why each other backend declines
    if not torch.cuda.is_available():
        print("skip: no CUDA device")
        return 0
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for B, T in ((8, 2048), (2, 8192)):
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                f, b = bench(B, T, 12, 192, 128, be)
                print(f"{name:9s} B={B} T={T} H=12 Dk=192 Dv=128 causal bf16: forward {f:.3f} ms, backward {b:.3f} ms")
            except Exception as e:  # a backend that does not take these shapes says so
                print(f"{name:9s} B={B} T={T}: not available ({str(e).splitlines()[0][:100]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
