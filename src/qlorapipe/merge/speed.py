"""Serving cost of a model: latency to the first token, tokens per second, memory."""

from __future__ import annotations


class _FirstTokenClock:
    """A generate() streamer that only calls ``on_first_token`` when the first new token arrives.

    generate() hands the streamer the prompt first, then each new token as it is sampled.
    """

    def __init__(self, on_first_token):
        self.calls = 0
        self.on_first_token = on_first_token

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.on_first_token()

    def end(self) -> None:
        """Nothing to flush: only the first token's arrival time is kept."""


def measure_speed(model, input_ids, new_tokens: int, device, repeats: int = 1) -> dict:
    """Latency and throughput of greedy generation of exactly ``new_tokens`` after ``input_ids``, by the
    decoder the pipeline's own generation uses (``greedy``: CUDA graphs on a GPU, transformers' ``generate``
    on the CPU).

    A warm-up run first (kernel selection, allocator; on a GPU it records the graph the timed runs
    replay: two tokens on the CPU); then ``repeats`` timed runs, the best reported, as timings on a
    shared machine only ever get slower. One is the default: at real sizes a 4-bit base + adapter on
    the CPU generates a few tokens a second, so each run costs seconds. Timings vary between runs;
    compare models measured in the same run.

    Returns:
        time_to_first_token_ms, tokens_per_second (after the first token), total_seconds, decoder
        ("cuda-graph", "static-cache" when no graph could be recorded, or "transformers-generate"),
        weights_mb and peak memory (GPU allocated on CUDA, process RSS on the CPU).
    """
    import torch

    from qlorapipe import greedy
    from qlorapipe.modeling import peak_rss_bytes

    model.eval()
    input_ids = input_ids.to(device)
    attention = torch.ones_like(input_ids)
    static = greedy.uses_static_decoder(model, device)
    if static:
        decoder = greedy.Decoder(model, input_ids.shape[0], input_ids.shape[1], new_tokens, set(), 0, device)

        def generate(count, first_token):
            decoder.run(input_ids, attention, on_first_token=first_token)  # no stop ids: exactly new_tokens
    else:
        def generate(count, first_token):
            # One unpadded sequence: the pad id is never used, it only keeps generate() from warning.
            streamer = None if first_token is None else _FirstTokenClock(first_token)
            model.generate(input_ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, use_cache=True,
                           pad_token_id=0, attention_mask=attention, streamer=streamer)

    label = "transformers-generate"
    try:
        with torch.no_grad():
            best = _timed_runs(generate, new_tokens, new_tokens if static else 2, repeats, device)
    finally:
        if static:
            label = "cuda-graph" if decoder.graph is not None else "static-cache"  # no graph: eager steps
            decoder.close()
    total, first = best
    metrics = {
        "new_tokens": new_tokens,
        "decoder": label,
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


def _timed_runs(generate, new_tokens: int, warm_up: int, repeats: int, device) -> tuple[float, float]:
    """(total seconds, seconds to the first token) of the fastest of ``repeats`` runs after a warm-up
    run of ``warm_up`` tokens."""
    import time

    import torch

    from qlorapipe import memory

    generate(warm_up, None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        memory.restart_peak(device)  # the decoder's own peak; the stage's so far is kept
    best = None
    for _ in range(repeats):
        first_token_at = []
        started = time.perf_counter()
        generate(new_tokens, lambda arrived=first_token_at: arrived.append(time.perf_counter()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - started
        first = first_token_at[0] - started
        if best is None or total < best[0]:
            best = (total, first)
    return best
