"""Copying 5.6 GB of float16 weights from the GPU to the CPU in 250 pieces, the ways a stage can do it.

    python benchmarks/host_copies.py

Each way prints its seconds and GB/s: ``tensor.to("cpu")`` into fresh pageable memory (what merge and
the reference logits did), ``copy_`` into pageable memory touched before, a pinned staging buffer
then a copy into fresh memory, one pinned buffer for everything (and what pinning it costs), and the
CPU's own copies. ``memory.to_host`` follows from it (docs/benchmarks.md, 2026-12-04 fourteenth run).
"""
import time, torch
dev = torch.device("cuda")
pieces = [torch.randn(2048, 11008 // 2, device=dev, dtype=torch.float16) for _ in range(250)]  # 250 x 22.5 MB = 5.6 GB
torch.cuda.synchronize()
def timed(name, fn):
    t = time.perf_counter(); out = fn(); torch.cuda.synchronize(); dt = time.perf_counter() - t
    gb = sum(p.numel() * 2 for p in pieces) / 1e9
    print(f"{name}: {dt:.2f} s, {gb / dt:.2f} GB/s", flush=True); return out
a = timed("to('cpu') fresh pageable", lambda: [p.to("cpu") for p in pieces]); del a
a = timed("to('cpu') fresh pageable again", lambda: [p.to("cpu") for p in pieces])
timed("copy_ into touched pageable", lambda: [d.copy_(p) for d, p in zip(a, pieces)]); del a
stage = torch.empty(pieces[0].numel(), dtype=torch.float16, pin_memory=True)
def via_stage():
    out = []
    for p in pieces:
        s = stage[: p.numel()].view(p.shape); s.copy_(p); out.append(s.clone())
    return out
a = timed("pinned stage then clone", via_stage); del a
def via_stage_empty():
    out = []
    for p in pieces:
        s = stage[: p.numel()].view(p.shape); s.copy_(p); d = torch.empty_like(s); d.copy_(s); out.append(d)
    return out
a = timed("pinned stage then empty+copy", via_stage_empty); del a
t = time.perf_counter(); big = torch.empty(sum(p.numel() for p in pieces), dtype=torch.float16, pin_memory=True); print("pin alloc 5.6 GB", round(time.perf_counter() - t, 2))
def into_big():
    o = 0
    for p in pieces:
        big[o : o + p.numel()].view(p.shape).copy_(p, non_blocking=True); o += p.numel()
timed("into one pinned buffer", into_big)
t = time.perf_counter(); x = torch.empty(sum(p.numel() for p in pieces), dtype=torch.float16); x.fill_(0); print("pageable alloc+touch 5.6 GB", round(time.perf_counter() - t, 2))
t = time.perf_counter(); x.copy_(big); print("CPU memcpy pinned->pageable 5.6 GB", round(time.perf_counter() - t, 2), "threads", torch.get_num_threads())
