"""Every parallel layout saves; every layout loads every checkpoint, bit-exact.

Layouts: single process, FSDP2 ws2/ws4, TP ws2, FSDP2+TP 2x2 (strided shards),
HSDP 2x2, FSDP1 ws2 (ShardedTensor), and a plain full model; model + Adam state
after one step; uneven dimensions (13 rows on 4 ranks, 3 rows on 4 ranks).
"""

from __future__ import annotations

import _matrix_cases as cases

from zarrckpt.testing import run_distributed


def test_resharding_matrix(tmp_path):
    root = str(tmp_path)
    single = cases.save_sources(root)
    ws2 = run_distributed(cases.run_save, 2, root)[0]
    ws4 = list(cases.SOURCES[4])
    sources = single + ws2 + ws4
    results: dict = {}
    results.update(run_distributed(cases.run_save_and_load, 4, root, single + ws2)[0])
    results.update(run_distributed(cases.run_load, 2, root, sources)[0])
    results.update(cases.load_all(root, sources))

    expected = {
        f"{s}->{t}" for s in sources for ts in cases.TARGETS.values() for t in ts
    }
    assert set(results) == expected
    bad = {k: v for k, v in results.items() if v["mismatched"] or not v["same_objects"]}
    assert not bad, bad
    # model (4 tensors) + Adam (3 per parameter) at least
    assert all(v["compared"] >= 4 + 4 * 3 for v in results.values())
