"""One rank of the end-to-end check: layer statistics and relevance over all ranks, both sharding modes.

Rank 0 saves the results under OUT/<by>/; every rank writes OUT/digest_<rank>.json (a hash of what it
holds), so the test can check that all ranks hold the same result. Usage (from the repository root):
``torchrun --nproc_per_node=2 tests/distributed_workers/compare.py OUT MODEL_FOLDER``.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from tests.distributed_workers import common
from tl_taskmap import distributed as D


def digest(stats, rels) -> str:
    h = hashlib.sha256(D._pack(*D._layer_stats_light(stats)).numpy().tobytes())
    for name, rel in rels.items():
        h.update(D._pack(*D._encode(rel)).numpy().tobytes())
    return h.hexdigest()


def main(out: Path, folder: str) -> None:
    torch.set_num_threads(1)
    with D.maybe_distributed(timeout=120):
        models, controls = common.models(folder)
        suite = common.suite()
        digests = {}
        for by in ("examples", "tasks"):
            stats = D.distributed_compare_models(models, suite, by=by, control_models=controls, progress=False,
                                                 keep_accumulators=by == "examples", **common.COMPARE_KW)
            rels = D.distributed_relevance(models["a"], suite, by=by, **common.RELEVANCE_KW)
            digests[by] = digest(stats, rels)
            if D.is_main_process():
                stats.save(out / by / "stats")
                for name, rel in rels.items():
                    rel.save(out / by / f"relevance_{name}.safetensors")
        (out / f"digest_{D.rank()}.json").write_text(json.dumps(digests))
        D.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
