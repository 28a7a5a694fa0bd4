"""One rank of the fast checks: exact all_merge of accumulators, and a failing or hung rank.

Usage: ``python merge_and_fail.py MODE OUT`` with torchrun's variables set (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). MODE ``merge``: every rank adds its shard of fixed data (the last rank has
none) and writes what all_merge returned to OUT/rank<r>.json. ``raise``: rank 1 raises while rank 0
waits in all_merge. ``hang``: rank 1 never joins the collective; rank 0 must time out.
"""

import json
import sys
import time
from pathlib import Path

import torch

from tl_taskmap import distributed as D
from tl_taskmap.stats.cka import StreamingLinearCKA
from tl_taskmap.stats.spectral import StreamingCovariance


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=gen, dtype=torch.float64) * 3 + 100  # a large offset: the merge re-centres
    return x, x[:, :2] ** 2 + torch.randn(9, 2, generator=gen, dtype=torch.float64)


def summary(cka: StreamingLinearCKA, cov: StreamingCovariance, rel) -> dict:
    return {"cka": [cka.cka(), cka.cka(debiased=True)], "n": cka.n, "eig": cov.eigenvalues().tolist(),
            "sum_abs": rel.sum_abs.flatten().tolist(), "n_examples": rel.n_examples, "name": rel.name}


def relevance_of(rows: torch.Tensor):
    from tl_taskmap.neurons.attribution import RelevanceScores

    return RelevanceScores(rows.abs().sum(0).reshape(1, 3), rows.sum(0).reshape(1, 3), n_examples=len(rows),
                           n_tokens=2 * len(rows), name="task", meta={"loss": "test"})


def main(mode: str, out: Path) -> None:
    with D.maybe_distributed(timeout=5 if mode == "hang" else 60):
        x, y = data()
        if mode == "raise" and D.rank() == 1:
            raise ValueError("deliberate failure on rank 1")
        if mode == "hang" and D.rank() == 1:
            time.sleep(300)
        span = D.shard_range(len(x), block=4)  # 9 rows in blocks of 4 over 3 ranks: [0:4], [4:9], nothing
        cka = StreamingLinearCKA(3, 2).add(x[span.start:span.stop], y[span.start:span.stop]) if len(span) else None
        cov = StreamingCovariance(3).add(x[span.start:span.stop]) if len(span) else None
        rel = relevance_of(x[span.start:span.stop]) if len(span) else None
        merged = summary(D.all_merge(cka), D.all_merge(cov), D.all_merge(rel))
        single = summary(StreamingLinearCKA(3, 2).add(x, y), StreamingCovariance(3).add(x), relevance_of(x))
        (out / f"rank{D.rank()}.json").write_text(json.dumps({"merged": merged, "single": single, "span": [span.start, span.stop]}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
