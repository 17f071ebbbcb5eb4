"""Benchmark of the paged-attention kernels on one CUDA GPU (Qwen2-0.5B heads: 14 query, 2 KV, dim 64).

Decode is timed as the engine runs it: inside a CUDA graph, over LAYERS distinct layer caches in a row
(so the K/V of one call is not still in L2 from the last), divided by LAYERS. Each row prints the
time per call, the K/V bytes it must read over that time, and the floor: those bytes over the
device's bandwidth (measured here by a large copy, and the nominal 3 TB/s of an H100).

Also probes `torch.nn.attention.varlen.varlen_attn`: whether its causal mask is bottom-right aligned
when seqlen_k > seqlen_q, and whether it takes a paged cache (`block_table`) at block size 16.

Run: `PYTHONPATH=. python3 bench/paged_attention.py`.

`--long` times the shapes of long contexts instead (issue 14): prefill chunks of 4k-16k new tokens over
prefixes up to 28k, each prefill tile configuration (BLOCK_M, BLOCK_N, warps, stages, diagonal split)
in TFLOP/s of causal attention, against torch's FlashAttention (`varlen_attn`) on the same K/V already
gathered densely (its kernel alone, the FA2-class yardstick); and decode at 4k-32k contexts for every
split count and inner tile.

Measured on an H100 80GB HBM3 (torch 2.11.0+cu130, triton 3.6.0; 2.98 TB/s copy), context 512,
per layer call, graph-replayed:

    decode B=64    triton 11.6 us (1.45 TB/s, 2.1x floor 5.6 us; 5.2 us of it is fixed cost)
                   torch reference 194 us
    decode B=256   triton 28.5 us (2.36 TB/s, 1.27x floor 22.4 us); torch reference 645 us
    write_kv N=256 triton 3.2 us; two index_copy_ 6.0 us
    prefill 64 x 256 new tokens: triton 56 us; gather + varlen_attn 235-373 us
"""

from __future__ import annotations

import inspect
import statistics

import torch

from agentrl.rollout.backends.embedded.kernels import paged_attention as pa

HQ, HKV, D, PAGE = 14, 2, 64, 16
LAYERS = 8
NOMINAL_BW = 3.0e12
DT = torch.bfloat16


def time_graph(fn, reps: int = 15, inner: int = 20) -> float:
    """Median seconds of one `fn()` replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def time_eager(fn, reps: int = 15, inner: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_eager(lambda: dst.copy_(src), reps=5, inner=5)


def make_layers(lens: list[int], width: int, gen: torch.Generator):
    """LAYERS caches, each holding the sequences in shuffled blocks; one shared block table."""
    per_seq = [-(-n // PAGE) for n in lens]
    num_blocks = sum(per_seq) + 8
    pool = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(per_seq):
        table[b, :nb] = pool[used:used + nb].int()
        used += nb
    caches = [(torch.randn(num_blocks, PAGE, HKV, D, device="cuda", dtype=DT),
               torch.randn(num_blocks, PAGE, HKV, D, device="cuda", dtype=DT)) for _ in range(LAYERS)]
    return caches, table.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


def decode_rows(batch: int, context: int, bandwidth: float, gen) -> list[tuple]:
    rows = []
    kv_bytes = batch * context * HKV * D * 2 * 2  # K and V, bf16
    floor_nominal, floor_measured = kv_bytes / NOMINAL_BW, kv_bytes / bandwidth
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    scale = D ** -0.5
    for width in (context // PAGE, 4096 // PAGE):
        caches, table, seq_lens = make_layers([context] * batch, width, gen)

        def layers(fn):
            return lambda: [fn(q, k, v, table, seq_lens, scale) for k, v in caches]

        default_splits = pa.default_num_splits(batch, HKV, width * PAGE, torch.cuda.get_device_properties(0)
                                               .multi_processor_count)
        variants = [(f"triton S={s}{'*' if s == default_splits else ''}",
                     lambda *a, s=s: pa.paged_decode_attention(*a, num_splits=s)) for s in (1, 2, 4, 8, 16)]
        if width == context // PAGE:
            variants.append(("torch reference", pa.paged_decode_attention_reference))
        for name, fn in variants:
            try:
                t = time_graph(layers(fn)) / LAYERS
            except Exception as exc:  # noqa: BLE001 - a bench row that fails is reported, not fatal
                print(f"  {name} B={batch} width={width}: failed: {str(exc)[:200]}")
                continue
            rows.append((f"decode B={batch} ctx={context} M={width}", name, t, kv_bytes / t / 1e9,
                         t / floor_measured, t / floor_nominal))
        for block_n, warps, stages in ((32, 2, 2), (64, 4, 2), (64, 2, 3), (128, 4, 2)):
            pa._DECODE_BLOCK_N, pa._DECODE_WARPS, pa._DECODE_STAGES = block_n, warps, stages
            try:
                t = time_graph(layers(pa.paged_decode_attention)) / LAYERS
                rows.append((f"decode B={batch} ctx={context} M={width}", f"triton BN={block_n} w={warps} st={stages}",
                             t, kv_bytes / t / 1e9, t / floor_measured, t / floor_nominal))
            finally:
                pa._DECODE_BLOCK_N, pa._DECODE_WARPS, pa._DECODE_STAGES = 64, 2, 2
        ones = torch.ones_like(seq_lens)  # what a call costs with (almost) nothing to read
        t = time_graph(lambda: [pa.paged_decode_attention(q, k, v, table, ones, scale) for k, v in caches]) / LAYERS
        rows.append((f"decode B={batch} ctx={context} M={width}", "triton default, seq_len=1", t, float("nan"),
                     float("nan"), float("nan")))
        t = time_eager(lambda: pa.paged_decode_attention(q, *caches[0], table, seq_lens, scale))
        rows.append((f"decode B={batch} ctx={context} M={width}", "triton default, eager, 1 layer", t,
                     kv_bytes / t / 1e9, t / floor_measured, t / floor_nominal))
    print(f"  floor B={batch} ctx={context}: {kv_bytes / 1e6:.1f} MB of K/V, {floor_measured * 1e6:.1f} us at "
          f"{bandwidth / 1e12:.2f} TB/s measured, {floor_nominal * 1e6:.1f} us at 3 TB/s")
    return rows


def ragged_rows(batch: int, bandwidth: float, gen) -> list[tuple]:
    """Lengths uniform in 1..1023 (mean ~512): one long sequence can hold up a program with no splits."""
    lens = torch.randint(1, 1024, (batch,), generator=gen).tolist()
    kv_bytes = sum(lens) * HKV * D * 2 * 2
    caches, table, seq_lens = make_layers(lens, 1024 // PAGE, gen)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    rows = []
    for splits in (None, 1, 2, 4):
        t = time_graph(lambda s=splits: [pa.paged_decode_attention(q, k, v, table, seq_lens, D ** -0.5,
                                                                   num_splits=s) for k, v in caches]) / LAYERS
        rows.append((f"decode B={batch} ragged 1..1023", f"triton S={splits or 'default'}", t, kv_bytes / t / 1e9,
                     t * bandwidth / kv_bytes, t * NOMINAL_BW / kv_bytes))
    return rows


def write_rows(gen) -> list[tuple]:
    k_cache = torch.randn(4096, PAGE, HKV, D, device="cuda", dtype=DT)
    v_cache = torch.randn_like(k_cache)
    rows = []
    for n in (256, 16384):
        k, v = (torch.randn(n, HKV, D, device="cuda", dtype=DT) for _ in range(2))
        slots = torch.randperm(4096 * PAGE, generator=gen)[:n].cuda()
        flat_k, flat_v = k_cache.view(-1, HKV, D), v_cache.view(-1, HKV, D)
        for name, fn in (("triton write_kv", lambda: pa.write_kv(k_cache, v_cache, k, v, slots)),
                         ("2x index_copy_", lambda: (flat_k.index_copy_(0, slots, k),
                                                     flat_v.index_copy_(0, slots, v)))):
            t = time_graph(fn)
            rows.append((f"write_kv N={n}", name, t, 4 * k.numel() * 2 / t / 1e9, float("nan"), float("nan")))
    return rows


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        print(f"varlen_attn: not importable ({exc})")
        return None, set()
    params = set(inspect.signature(varlen_attn).parameters)
    print(f"varlen_attn parameters: {sorted(params)}")
    return varlen_attn, params


def _causal_kwargs(params) -> dict:
    return {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}


def probe_varlen_alignment(varlen_attn, params) -> None:
    """seqlen_q 3 < seqlen_k 8: compare with both ways of aligning the causal mask."""
    torch.manual_seed(0)
    q = torch.randn(3, 2, 64, device="cuda", dtype=DT)
    k, v = (torch.randn(8, 2, 64, device="cuda", dtype=DT) for _ in range(2))
    cu_q = torch.tensor([0, 3], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
    out = varlen_attn(q, k, v, cu_q, cu_k, 3, 8, **_causal_kwargs(params)).float()

    def masked(q_pos):
        scores = torch.einsum("nhd,lhd->hnl", q.float(), k.float()) / 8.0
        visible = torch.arange(8, device="cuda")[None, :] <= q_pos[:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        return torch.einsum("hnl,lhd->nhd", probs, v.float())

    bottom_right = (out - masked(torch.arange(5, 8, device="cuda"))).abs().max().item()
    top_left = (out - masked(torch.arange(0, 3, device="cuda"))).abs().max().item()
    verdict = "BOTTOM-RIGHT" if bottom_right < 2e-2 < top_left else "TOP-LEFT" if top_left < 2e-2 else "NEITHER"
    print(f"varlen_attn causal alignment: {verdict} (diff vs bottom-right {bottom_right:.3g}, "
          f"vs top-left {top_left:.3g})")


def varlen_paged_call(varlen_attn, params, q, k_cache, v_cache, table, cu_q, seq_lens, max_q, max_k):
    cu_k = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return varlen_attn(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, scale=D ** -0.5, enable_gqa=True,
                       seqused_k=seq_lens, block_table=table, **_causal_kwargs(params))


def prefill_case(batch: int, prefix: int, new: int, gen):
    """One prefill call: `batch` sequences of `prefix` cached tokens + `new` ones. (args, label, causal FLOPs)."""
    caches, table, seq_lens = make_layers([prefix + new] * batch, -(-(prefix + new) // PAGE), gen)
    cu_q = torch.arange(0, (batch + 1) * new, new, dtype=torch.int32, device="cuda")
    q = torch.randn(batch * new, HQ, D, device="cuda", dtype=DT)
    args = (q, *caches[0], table, cu_q, seq_lens, D ** -0.5)
    return args, f"prefill B={batch} prefix={prefix} new={new}", 4 * batch * HQ * D * (new * prefix + new * (new + 1) / 2)


def prefill_rows(varlen_attn, params, gen) -> list[tuple]:
    rows = []
    for batch, prefix, new in ((64, 0, 256), (32, 256, 32), (4, 0, 2048)):
        args, label, flops = prefill_case(batch, prefix, new, gen)
        q, k_cache, v_cache, table, cu_q, seq_lens, scale = args
        ref = pa.paged_prefill_attention_reference(*args)
        out = pa.paged_prefill_attention(*args, new, prefix + new)
        print(f"  {label}: triton max abs diff vs reference {(out.float() - ref.float()).abs().max().item():.3g}")
        t = time_eager(lambda: pa.paged_prefill_attention(*args, new, prefix + new))
        rows.append((label, "triton, eager", t, flops / t / 1e12, float("nan"), float("nan")))
        t = time_graph(lambda: pa.paged_prefill_attention(*args, new, prefix + new))
        rows.append((label, "triton, graph", t, flops / t / 1e12, float("nan"), float("nan")))
        if varlen_attn is None:
            continue
        if "block_table" in params:
            try:
                got = varlen_paged_call(varlen_attn, params, q, k_cache, v_cache, table, cu_q, seq_lens, new,
                                        prefix + new)
                print(f"  {label}: varlen_attn paged max abs diff {(got.float() - ref.float()).abs().max().item():.3g}")
                t = time_eager(lambda: varlen_paged_call(varlen_attn, params, q, k_cache, v_cache, table, cu_q,
                                                         seq_lens, new, prefix + new))
                rows.append((label, "varlen_attn paged", t, flops / t / 1e12, float("nan"), float("nan")))
            except Exception as exc:  # noqa: BLE001
                print(f"  {label}: varlen_attn paged failed: {str(exc)[:300]}")

        def gathered():  # gather each sequence's K/V densely, repeat heads, then varlen_attn
            pos = torch.arange(prefix + new, device="cuda")
            blocks = table[:, pos // PAGE].long()
            k = k_cache[blocks, pos % PAGE].flatten(0, 1).repeat_interleave(HQ // HKV, 1)
            v = v_cache[blocks, pos % PAGE].flatten(0, 1).repeat_interleave(HQ // HKV, 1)
            cu_k = torch.arange(0, (batch + 1) * (prefix + new), prefix + new, dtype=torch.int32, device="cuda")
            return varlen_attn(q, k, v, cu_q, cu_k, new, prefix + new, scale=scale, **_causal_kwargs(params))
        try:
            got = gathered()
            print(f"  {label}: gather+varlen_attn max abs diff {(got.float() - ref.float()).abs().max().item():.3g}")
            t = time_eager(gathered)
            rows.append((label, "gather + varlen_attn", t, flops / t / 1e12, float("nan"), float("nan")))
        except Exception as exc:  # noqa: BLE001
            print(f"  {label}: gather+varlen_attn failed: {str(exc)[:300]}")
    return rows


def varlen_decode_rows(varlen_attn, params, bandwidth, gen) -> list[tuple]:
    rows = []
    for batch in (64, 256):
        caches, table, seq_lens = make_layers([512] * batch, 32, gen)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        kv_bytes = batch * 512 * HKV * D * 4
        try:
            ref = pa.paged_decode_attention_reference(q, *caches[0], table, seq_lens, D ** -0.5)
            got = varlen_paged_call(varlen_attn, params, q, *caches[0], table, cu_q, seq_lens, 1, 512)
            diff = (got.float() - ref.float()).abs().max().item()
            print(f"  varlen_attn paged decode B={batch}: max abs diff {diff:.3g}")
            t = time_graph(lambda: [varlen_paged_call(varlen_attn, params, q, k, v, table, cu_q, seq_lens, 1, 512)
                                    for k, v in caches]) / LAYERS
            rows.append((f"decode B={batch} ctx=512 M=32", "varlen_attn paged", t, kv_bytes / t / 1e9,
                         t * bandwidth / kv_bytes, t * NOMINAL_BW / kv_bytes))
        except Exception as exc:  # noqa: BLE001
            print(f"  varlen_attn paged decode B={batch} failed: {str(exc)[:300]}")
    return rows


PREFILL_CONFIGS = (  # BLOCK_M, BLOCK_N, warps, stages, split diagonal, accumulate in the dot (pa.PREFILL_KNOBS);
    # the first is the kernel as it was before the diagonal split
    (64, 64, 4, 2, False, False), (64, 64, 4, 2, True, False), (64, 64, 4, 2, True, True),
    (128, 64, 8, 3, True, False), (128, 64, 8, 3, True, True), (128, 64, 8, 2, True, True),
    (128, 128, 8, 3, True, True), (64, 128, 4, 3, True, True), (64, 64, 4, 3, True, True))


def _tile_name(cfg) -> str:
    return f"triton M{cfg[0]} N{cfg[1]} w{cfg[2]} s{cfg[3]}{' diag' if cfg[4] else ''}{' acc' if cfg[5] else ''}"


def long_prefill_rows(varlen_attn, params, gen) -> list[tuple]:
    rows = []
    saved = tuple(getattr(pa, k) for k in pa.PREFILL_KNOBS)
    for batch, prefix, new in ((1, 0, 4096), (1, 12288, 4096), (1, 28000, 4000), (1, 0, 16384), (4, 0, 4096),
                               (1, 16000, 16000), (64, 0, 256)):
        args, label, flops = prefill_case(batch, prefix, new, gen)
        q, k_cache, v_cache, table, cu_q, seq_lens, scale = args
        ref = pa.paged_prefill_attention_reference(*args) if batch * (prefix + new) <= 32768 else None
        for cfg in PREFILL_CONFIGS:
            for knob, value in zip(pa.PREFILL_KNOBS, cfg):
                setattr(pa, knob, value)
            try:
                out = pa.paged_prefill_attention(*args, new, prefix + new)
                diff = float("nan") if ref is None else (out.float() - ref.float()).abs().max().item()
                t = time_eager(lambda: pa.paged_prefill_attention(*args, new, prefix + new), reps=5, inner=5)
                rows.append((label, _tile_name(cfg), t, flops / t / 1e12, diff, float("nan")))
            except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is reported
                print(f"  {label} {cfg}: failed: {str(exc)[:200]}")
            finally:
                for knob, value in zip(pa.PREFILL_KNOBS, saved):
                    setattr(pa, knob, value)
        if varlen_attn is None:
            continue
        pos = torch.arange(prefix + new, device="cuda")
        blocks = table[:, pos // PAGE].long()
        k = k_cache[blocks, pos % PAGE].flatten(0, 1).repeat_interleave(HQ // HKV, 1)
        v = v_cache[blocks, pos % PAGE].flatten(0, 1).repeat_interleave(HQ // HKV, 1)
        cu_k = torch.arange(0, (batch + 1) * (prefix + new), prefix + new, dtype=torch.int32, device="cuda")
        try:
            t = time_eager(lambda: varlen_attn(q, k, v, cu_q, cu_k, new, prefix + new, scale=scale,
                                               **_causal_kwargs(params)), reps=5, inner=5)
            rows.append((label, "varlen_attn (K/V dense, kernel only)", t, flops / t / 1e12, float("nan"),
                         float("nan")))
        except Exception as exc:  # noqa: BLE001
            print(f"  {label}: varlen_attn failed: {str(exc)[:300]}")
    return rows


def long_decode_rows(bandwidth, gen) -> list[tuple]:
    rows = []
    scale = D ** -0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, context in ((16, 16256), (8, 32256), (64, 4352), (32, 7700), (256, 768)):
        kv_bytes = batch * context * HKV * D * 2 * 2
        floor = kv_bytes / bandwidth
        width = -(-context // PAGE)
        caches, table, seq_lens = make_layers([context] * batch, width, gen)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
        case = f"decode B={batch} ctx={context}"
        default = pa.default_num_splits(batch, HKV, width * PAGE, sms)
        for block_n, warps, stages in ((64, 2, 2), (64, 4, 2), (128, 4, 2), (64, 4, 3), (32, 2, 3)):
            for splits in (1, 2, 4, 8, 16, 32):
                pa._DECODE_BLOCK_N, pa._DECODE_WARPS, pa._DECODE_STAGES = block_n, warps, stages
                try:
                    t = time_graph(lambda s=splits: [pa.paged_decode_attention(q, k, v, table, seq_lens, scale,
                                                                               num_splits=s) for k, v in caches],
                                   reps=7, inner=10) / LAYERS
                    mark = "*" if (splits, block_n, warps, stages) == (default, 64, 2, 2) else ""
                    rows.append((case, f"S={splits}{mark} BN={block_n} w={warps} st={stages}", t,
                                 kv_bytes / t / 1e9, t / floor, float("nan")))
                except Exception as exc:  # noqa: BLE001
                    print(f"  {case} S={splits} BN={block_n}: failed: {str(exc)[:200]}")
                finally:
                    pa._DECODE_BLOCK_N, pa._DECODE_WARPS, pa._DECODE_STAGES = 64, 2, 2
    return rows


def main() -> None:
    import argparse

    import triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", action="store_true", help="the long-context shapes and the tile sweep")
    ap.add_argument("--no-decode", action="store_true", help="with --long: the prefill rows only")
    ap.add_argument("--tiles", help="with --long: prefill tiles to sweep, 'M,N,warps,stages,acc;...' (diagonal "
                                    "split on; acc 1 accumulates P @ V in the dot)")
    cli = ap.parse_args()
    if cli.tiles:
        global PREFILL_CONFIGS
        PREFILL_CONFIGS = tuple((m, n, w, st, True, bool(acc)) for m, n, w, st, acc in
                                (map(int, t.split(",")) for t in cli.tiles.split(";")))
    long_mode = cli.long

    props = torch.cuda.get_device_properties(0)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {props.name}, {props.multi_processor_count} SMs")
    gen = torch.Generator().manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    varlen_attn, params = _varlen()
    if varlen_attn is not None:
        try:
            probe_varlen_alignment(varlen_attn, params)
        except Exception as exc:  # noqa: BLE001
            print(f"varlen_attn alignment probe failed: {str(exc)[:300]}")
    rows = []
    if long_mode:
        rows += long_prefill_rows(varlen_attn, params, gen)
        rows += [] if cli.no_decode else long_decode_rows(bandwidth, gen)
    for batch in () if long_mode else (64, 256):
        rows += decode_rows(batch, 512, bandwidth, gen)
        rows += ragged_rows(batch, bandwidth, gen)
    if not long_mode:
        rows += write_rows(gen)
        rows += prefill_rows(varlen_attn, params, gen)
    if "block_table" in params and not long_mode:  # last: a failed graph capture could spoil what follows
        rows += varlen_decode_rows(varlen_attn, params, bandwidth, gen)
    print(f"\n{'case':34} {'impl':32} {'us/call':>9} {'GB/s|TF/s':>10} {'x floor|diff':>8} {'x 3TB/s':>8}")
    for case, impl, t, rate, x_meas, x_nom in rows:
        print(f"{case:34} {impl:32} {t * 1e6:9.1f} {rate:10.1f} {x_meas:8.2f} {x_nom:8.2f}")


if __name__ == "__main__":
    main()
