"""Speed measurement helpers of the ``benchmarks/`` scripts: the matmul probe (what the
hardware does on its best kernel) and FLOP counting of forward + backward passes."""

from __future__ import annotations

import contextlib
import time


def sync_device(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_probe(device: str = "cpu", seconds: float = 1.5, n: int | None = None) -> float:
    """Best FLOP/s of an n x n matmul (fp32 on CPU, n = 2048; bf16 on GPU, n = 8192) over
    ~``seconds``, at the current ``torch.get_num_threads()``."""
    import torch

    device = str(device)
    gpu = device.startswith("cuda")
    n = n or (8192 if gpu else 2048)
    dtype = torch.bfloat16 if gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)
    sync_device(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync_device(device)
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _custom_flop_formulas() -> dict:
    """FLOP formulas for the CPU fused attention kernels, which FlopCounterMode lacks."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    # FlopCounterMode passes the shapes of tensor arguments to custom formulas
    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    custom = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            custom[op] = fn
    return custom


@contextlib.contextmanager
def count_flops():
    """Count the FLOPs of everything run inside the block, forward and backward
    (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention; 2
    FLOPs per multiply-add; element-wise work is not counted). Yields a ``dict`` whose
    ``"total"`` is filled in when the block ends."""
    from torch.utils.flop_counter import FlopCounterMode

    out: dict = {"total": 0}
    with FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas()) as fc:
        yield out
    out["total"] = int(fc.get_total_flops())


__all__ = ["matmul_probe", "count_flops", "sync_device"]
