"""The memory-bandwidth roofline for decode: how close a model's token rate comes to what memory allows.

    python -c "import roofline, torch; print(roofline.measure_read_bandwidth(torch.device('cpu')))"

Decoding one token reads every weight once, so a model of W bytes cannot decode faster than
B / W tokens/s on a machine that reads B bytes/s. `measure_read_bandwidth` measures B once per run
with a short read test (a reduction over a buffer far larger than the caches, best of a few passes,
as STREAM reports its best); `roofline` puts a decode figure against it: achieved bandwidth
W x tok/s (what gpt-fast prints as "bandwidth achieved") and its fraction of B.
"""

from __future__ import annotations

import time

import torch

import models
import results_io
from records import Roofline

DEFAULT_READ_BYTES = 1 << 29  # 512 MiB: many times any last-level cache
DEFAULT_PASSES = 5


def measure_read_bandwidth(device: torch.device, nbytes: int = DEFAULT_READ_BYTES,
                           passes: int = DEFAULT_PASSES) -> dict:
    """Bytes/s that torch reads from `device` memory: sum() over an fp32 buffer, timed `passes` times
    after one warm-up, device synchronised around each. Returns GB/s best and mean ± std."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buffer.sum()
    models.synchronize(device)
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        buffer.sum()
        models.synchronize(device)
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    del buffer
    mean, std = results_io.mean_std(rates)
    return {"best_gb_s": round(max(rates), 2), "mean_gb_s": round(mean, 2), "std_gb_s": round(std, 2),
            "bytes": nbytes, "passes": passes, "threads": torch.get_num_threads(), "device": str(device),
            "method": f"torch fp32 sum over {nbytes >> 20} MiB, best of {passes} after a warm-up"}


def roofline(weight_bytes: int, decode_tok_s: float, bandwidth: dict | None) -> Roofline:
    """Decode against the read bandwidth: achieved GB/s, its fraction of the measured peak, and the
    decode rate the peak would allow."""
    achieved = weight_bytes * decode_tok_s / 1e9
    peak = bandwidth["best_gb_s"] if bandwidth else None
    return Roofline(weight_bytes=weight_bytes, decode_tok_s=decode_tok_s, achieved_gb_s=round(achieved, 3),
                    peak_gb_s=peak, fraction=round(achieved / peak, 4) if peak else None,
                    bound_tok_s=round(peak * 1e9 / weight_bytes, 2) if peak else None,
                    method="weight bytes x decode tok/s (every weight read once per token), against "
                           + (bandwidth["method"] if bandwidth else "no measured bandwidth"))
