"""Serving cost of a model: latency to the first token, tokens per second, memory."""

from __future__ import annotations


class _FirstTokenClock:
    """A generate() streamer that only notes when the first new token arrives.

    generate() hands the streamer the prompt first, then each new token as it is sampled.
    """

    def __init__(self):
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        import time

        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        """Nothing to flush: only the first token's arrival time is kept."""


def measure_speed(model, input_ids, new_tokens: int, device, repeats: int = 1) -> dict:
    """Latency and throughput of greedy generation of exactly ``new_tokens`` after ``input_ids``.

    A two-token run warms up (kernel selection, allocator); then ``repeats`` timed runs, the best
    reported, as timings on a shared machine only ever get slower. One is the default: at real sizes a
    4-bit base + adapter generates a few tokens a second, so each run costs seconds. Timings vary
    between runs; compare models measured in the same run.

    Returns:
        time_to_first_token_ms, tokens_per_second (after the first token), total_seconds,
        weights_mb and peak memory (GPU allocated on CUDA, process RSS on the CPU).
    """
    import time

    import torch

    from qlorapipe.modeling import peak_rss_bytes

    model.eval()
    input_ids = input_ids.to(device)
    # One unpadded sequence: the pad id is never used, it only keeps generate() from warning.
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, attention_mask=torch.ones_like(input_ids))
    with torch.no_grad():
        model.generate(input_ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        best = None
        for _ in range(repeats):
            clock = _FirstTokenClock()
            started = time.perf_counter()
            model.generate(input_ids, streamer=clock, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = time.perf_counter() - started
            first = clock.first_token_at - started
            if best is None or total < best[0]:
                best = (total, first)
    total, first = best
    metrics = {
        "new_tokens": new_tokens,
        "time_to_first_token_ms": round(1000 * first, 2),
        "tokens_per_second": round((new_tokens - 1) / max(total - first, 1e-9), 2),
        "total_seconds": round(total, 4),
        "weights_mb": round(model.get_memory_footprint() / 1e6, 2),
    }
    if device.type == "cuda":
        metrics["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 1e6, 2)
    else:
        metrics["process_peak_rss_mb"] = round(peak_rss_bytes() / 1e6, 2)
    return metrics
