"""Benchmark: streaming feature-space CKA vs dense n x n Gram-matrix CKA, all layers of two models.

Two synthetic "models" produce per-layer activations for the same examples. The streaming path
feeds them batch by batch into one ``StreamingLinearCKA`` per layer and never keeps activations;
the dense path caches every layer's activations (as the Layer-by-Layer scripts do with .npy files)
and computes ``cka_from_grams(gram_linear(x), gram_linear(y))``. The script prints the time of
each path, their ratio, their peak memory, and the streaming state size at two values of N (it
does not grow with N).

    python tests/benchmarks/bench_cka_streaming.py --n 5000 --layers 12 --d 576

Memory: the dense path is measured with tracemalloc (NumPy reports its allocations to it); the
streaming path as the bytes of its float64 statistics plus one input batch, from tensor sizes
(torch's CPU allocator is invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1500, help="examples (default 1500)")
    parser.add_argument("--layers", type=int, default=4, help="layers per model (default 4)")
    parser.add_argument("--d", type=int, default=128, help="feature width (default 128)")
    parser.add_argument("--batch", type=int, default=256, help="streaming batch size (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/torch threads for both paths (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    # BLAS reads its thread count when NumPy loads, so fix it before the imports below; one thread
    # by default keeps the comparison fair and quiet on a shared machine.
    _THREADS = str(build_parser().parse_args().threads)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _THREADS

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tl_taskmap.stats import StreamingLinearCKA, cka_from_grams, gram_linear  # noqa: E402


def synthetic_batch(layer: int, start: int, stop: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations of examples [start, stop) at one layer of model A and model B (fp32).

    Seeded by (seed, layer, start), so both paths see the same data when they use the same batches.
    """
    mix = np.random.default_rng([seed, layer]).normal(size=(d, d)) / np.sqrt(d)
    rng = np.random.default_rng([seed, layer, start])
    z = rng.normal(size=(stop - start, d)) + 3.0  # a common offset, as real residual streams have
    y = z @ mix * (1 + layer / 4) + rng.normal(size=z.shape) * layer / 4
    return z.astype(np.float32), y.astype(np.float32)


def layer_activations(layer: int, n: int, d: int, seed: int, batch: int):
    for start in range(0, n, batch):
        yield synthetic_batch(layer, start, min(start + batch, n), d, seed)


def run_streaming(n: int, layers: int, d: int, seed: int, batch: int) -> dict:
    seconds, values, state_bytes, batch_bytes = 0.0, [], 0, 0
    for layer in range(layers):
        acc = StreamingLinearCKA(d, d)
        for x, y in layer_activations(layer, n, d, seed, batch):
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            batch_bytes = max(batch_bytes, xt.nbytes + yt.nbytes)
            t0 = time.perf_counter()
            acc.add(xt, yt)
            seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        values.append(acc.cka())
        seconds += time.perf_counter() - t0
        state_bytes = sum(v.nbytes for v in acc.state_dict().values())
    # One accumulator per layer is alive at a time here; all layers at once would be layers x this.
    return dict(seconds=seconds, values=values, peak_bytes=state_bytes + batch_bytes, state_bytes=state_bytes)


def run_dense(n: int, layers: int, d: int, seed: int, batch: int) -> dict:
    cache = []
    for layer in range(layers):  # cache activations, as the paper's pipeline stores .npy per layer
        parts = list(layer_activations(layer, n, d, seed, batch))
        cache.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    tracemalloc.start()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    seconds, values = 0.0, []
    for x, y in cache:
        t0 = time.perf_counter()
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        values.append(cka_from_grams(gram_linear(x64), gram_linear(y64)))
        seconds += time.perf_counter() - t0
        del x64, y64
    peak = tracemalloc.get_traced_memory()[1] - baseline
    tracemalloc.stop()
    cache_bytes = sum(x.nbytes + y.nbytes for x, y in cache)
    return dict(seconds=seconds, values=values, peak_bytes=peak + cache_bytes, cache_bytes=cache_bytes)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:9.1f} MiB"


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"n={args.n} layers={args.layers} d={args.d} batch={args.batch} threads={args.threads} "
          "(biased linear CKA, float64)")
    stream = run_streaming(args.n, args.layers, args.d, args.seed, args.batch)
    dense = run_dense(args.n, args.layers, args.d, args.seed, args.batch)
    max_diff = max(abs(a - b) for a, b in zip(stream["values"], dense["values"]))
    print(f"per-layer CKA          : {' '.join(f'{v:.4f}' for v in stream['values'])}")
    print(f"max |streaming - dense|: {max_diff:.2e}")
    print(f"streaming  time {stream['seconds']:8.3f} s   peak {mib(stream['peak_bytes'])} "
          f"(state {mib(stream['state_bytes'])} + one batch)")
    print(f"dense n×n  time {dense['seconds']:8.3f} s   peak {mib(dense['peak_bytes'])} "
          f"(cached activations {mib(dense['cache_bytes'])} + Gram matrices)")
    print(f"time ratio dense/streaming: {dense['seconds'] / stream['seconds']:.1f}x; "
          f"memory ratio: {dense['peak_bytes'] / stream['peak_bytes']:.1f}x")

    small = run_streaming(max(args.n // 4, 4), args.layers, args.d, args.seed, args.batch)
    print("streaming memory vs N (does not grow with N):")
    for n, result in ((max(args.n // 4, 4), small), (args.n, stream)):
        print(f"  N={n:7d}: state {mib(result['state_bytes'])}, peak {mib(result['peak_bytes'])}")
    assert small["state_bytes"] == stream["state_bytes"]


if __name__ == "__main__":
    main()
