"""Faiss indexes over unit item vectors (inner product = cosine), built by the publisher.

Which index, by size (``kind="auto"``):

* below ``exact_below`` (100k) vectors: exact ``IndexIDMap2(IndexFlatIP)``;
* from there on: ``large_kind``, by default HNSW (M=32, efSearch=64) over float16 copies of the
  vectors (``IndexIDMap2(IndexHNSWSQ)`` with ``QT_fp16``; ``hnsw_storage="float32"``:
  ``IndexHNSWFlat``), or IVF (``IndexIVFFlat`` with nlist ≈ 4·√n, nprobe=16);
* from ``ivfpq_above`` (default: never; the publisher's ``publisher.ivfpq_above``, 10M) vectors
  on: IVF-PQ (``IndexIVFPQ``, nlist ≈ 4·√n, nprobe=16, product-quantised codes of ``pq_m``
  bytes per vector, default d/4: 16 bytes instead of 256 for d=64), for catalogues of tens of
  millions of items whose float vectors (and HNSW graph) would not fit a retriever's memory.
  Its scores are approximate inner products (from the codes; the retriever scores the hits
  again from the float vectors) and its recall is lower than IVF-Flat's at the same nprobe: the
  build-time recall check reports it.

HNSW stores its vectors as float16 by default: half the memory for them (128 MB instead of
256 MB at 1M items, d=64; the index 408 MB instead of 536 MB with its graph), and a build over
1M items took 199 s instead of 296 s, at the same recall (0.569 against 0.562 on random unit
vectors). Searches cost about the same in the retriever, whose index sits in huge pages (search
p50 0.43-0.45 ms against 0.43-0.55 ms, docs/BENCHMARKS.md session 11); in memory with 4 KB
pages float16 searched faster (the same graph: p50 0.31-0.32 against 0.40-0.44 ms). The
index's scores come from the float16 codes, within about 1e-3 of the exact cosine; the
retriever scores the hits again from the float32 vectors it keeps anyway
(``ServingState.rescore``), so served scores and their order are exact.

Every kind takes new items with ``add_with_ids`` (a retriever applying a delta adds the new
rows without rebuilding). Removal differs:

========  ==================  ==========================================================
kind      ``add_with_ids``    ``remove_ids``
========  ==================  ==========================================================
flat      yes                 yes
ivf       yes                 yes (IVF keeps ids natively; no id map needed)
ivfpq     yes                 yes (as ivf)
hnsw      yes                 **no** — HNSW graphs cannot drop nodes; filter removed ids
                              out of search results until the next full snapshot
========  ==================  ==========================================================

:func:`supports_remove` answers this for a (deserialized) index. Search parameters
(efSearch, nprobe) travel inside the serialized bytes. Indexes cross the network as
``faiss.serialize_index`` bytes (:func:`serialize` / :func:`deserialize`), never pickle.

An approximate index is checked at build time: its recall@k against exact search on a
sample of perturbed item vectors is logged and set on the ``twotower_publisher_index_recall``
gauge (an exact index reports 1.0 without measuring).
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np
from prometheus_client import Gauge
from tqdm import tqdm

from twotower.index_layout import unwrapped

log = logging.getLogger(__name__)

INDEX_RECALL = Gauge(
    "twotower_publisher_index_recall", "Recall@k of the last built index against exact inner-product search"
)

FLAT = "flat"
HNSW = "hnsw"
IVF = "ivf"
IVFPQ = "ivfpq"
AUTO = "auto"
KINDS = (AUTO, FLAT, HNSW, IVF, IVFPQ)

FLOAT32 = "float32"
FLOAT16 = "float16"
HNSW_STORAGES = (FLOAT32, FLOAT16)
"""How an HNSW index stores its vectors (:func:`build_index`'s ``hnsw_storage``)."""

EXACT_BELOW = 100_000
"""Below this many vectors ``auto`` builds an exact index."""
_ADD_BATCH = 50_000
_IVF_TRAIN_PER_LIST = 256
"""At most this many training points per IVF list (k-means gains nothing from more)."""


_PQ_TRAIN_PER_CODE = 64
"""IVF-PQ trains its codebooks (2**bits centroids per sub-quantizer) on at least this many
points per centroid (when there are that many)."""


class IndexBuildError(ValueError):
    """Vectors, ids or parameters an index cannot be built from, or bytes that are no index."""


def _check_inputs(vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if vectors.ndim != 2:
        raise IndexBuildError(f"vectors must be a 2-d array, got shape {vectors.shape}")
    if vectors.shape[1] < 1:
        raise IndexBuildError("vectors must have at least one dimension")
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != vectors.shape[0]:
        raise IndexBuildError(f"{ids.shape} ids for {vectors.shape[0]} vectors")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise IndexBuildError(f"ids must be integers, got {ids.dtype}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(x).all():
        raise IndexBuildError("vectors hold NaN or infinite values")
    return x, np.ascontiguousarray(ids, dtype=np.int64)


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` vectors: about 4·√n, at least 1 and at most ``n``."""
    return max(1, min(n, round(4 * math.sqrt(n))))


def default_pq_m(d: int) -> int:
    """PQ sub-quantizers for dimension ``d``: the largest divisor of ``d`` not above ``d / 4``
    (4 dimensions per one-byte code; 16 for d=64)."""
    target = max(1, d // 4)
    return max(m for m in range(1, target + 1) if d % m == 0)


def _add(index: faiss.Index, x: np.ndarray, ids: np.ndarray, progress: bool, label: str) -> None:
    starts = range(0, x.shape[0], _ADD_BATCH)
    for start in tqdm(starts, desc=f"indexing ({label})", unit="batch", disable=not progress or len(starts) < 2):
        index.add_with_ids(x[start : start + _ADD_BATCH], ids[start : start + _ADD_BATCH])


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    kind: str = AUTO,
    *,
    exact_below: int = EXACT_BELOW,
    large_kind: str = HNSW,
    ivfpq_above: int | None = None,
    hnsw_m: int = 32,
    hnsw_storage: str = FLOAT16,
    ef_search: int = 64,
    ef_construction: int = 80,
    nlist: int | None = None,
    nprobe: int = 16,
    pq_m: int | None = None,
    pq_bits: int = 8,
    recall_queries: int = 256,
    recall_k: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> faiss.Index:
    """An inner-product index over ``vectors`` whose search results are ``ids``.

    Args:
        vectors: ``[n, d]`` unit vectors (float32 or convertible).
        ids: ``[n]`` integer ids, one per vector (the publisher uses row positions).
        kind: ``auto``, ``flat``, ``hnsw``, ``ivf`` or ``ivfpq``.
        exact_below: ``auto`` builds ``flat`` below this many vectors, ``large_kind`` otherwise.
        large_kind: ``hnsw`` or ``ivf``, what ``auto`` builds for large inputs.
        ivfpq_above: ``auto`` builds ``ivfpq`` from this many vectors on (``None``: never).
        hnsw_m: HNSW graph degree.
        hnsw_storage: how HNSW stores the vectors it compares: ``float16`` (half their memory,
            a faster build, scores within ~1e-3) or ``float32`` (exact scores).
        ef_search: HNSW search beam width (stored in the index).
        ef_construction: HNSW build beam width.
        nlist: IVF list count; ``None`` means :func:`default_nlist`.
        nprobe: IVF lists searched per query (stored in the index, capped at nlist).
        pq_m: IVF-PQ sub-quantizers (bytes per vector with 8-bit codes); must divide the
            dimension; ``None`` means :func:`default_pq_m`.
        pq_bits: bits per IVF-PQ code (training needs at least ``2**pq_bits`` vectors).
        recall_queries: sample size of the build-time recall check of an approximate index;
            0 skips it.
        recall_k: k of that check.
        seed: seed of the IVF training sample and of the recall sample.
        progress: show a tqdm bar while adding (useful for big builds from a terminal).

    Returns:
        The index, with ``ntotal == n``.

    Raises:
        IndexBuildError: bad shapes, non-finite values, an unknown kind or HNSW storage, IVF over
            no vectors, or IVF-PQ with a bad ``pq_m`` / too few vectors to train its codebooks.
    """
    x, ids = _check_inputs(vectors, ids)
    n, d = x.shape
    if kind not in KINDS:
        raise IndexBuildError(f"unknown index kind {kind!r}; choose from {KINDS}")
    if hnsw_storage not in HNSW_STORAGES:
        raise IndexBuildError(f"hnsw_storage must be one of {HNSW_STORAGES}, got {hnsw_storage!r}")
    if large_kind not in (HNSW, IVF):
        raise IndexBuildError(f"large_kind must be {HNSW!r} or {IVF!r}, got {large_kind!r}")
    if kind == AUTO and ivfpq_above is not None and n >= ivfpq_above:
        kind = IVFPQ
    elif kind == AUTO:
        kind = FLAT if n < exact_below else large_kind
    started = time.perf_counter()
    if kind == FLAT:
        index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == HNSW:
        if hnsw_storage == FLOAT16:
            graph = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.train(x[:1])  # float16 codes need no statistics; the index wants train() called
        else:
            graph = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = ef_construction
        graph.hnsw.efSearch = ef_search
        index = faiss.IndexIDMap2(graph)
    else:
        if n == 0:
            raise IndexBuildError("an IVF index cannot be trained on zero vectors")
        lists = min(nlist or default_nlist(n), n)
        quantizer = faiss.IndexFlatIP(d)
        train_size = lists * _IVF_TRAIN_PER_LIST
        if kind == IVFPQ:
            m = pq_m or default_pq_m(d)
            if d % m != 0:
                raise IndexBuildError(f"pq_m={m} does not divide the dimension {d}")
            if not 1 <= pq_bits <= 16 or n < 2**pq_bits:
                raise IndexBuildError(f"IVF-PQ with {pq_bits}-bit codes needs at least {2**pq_bits} vectors, got {n}")
            ivf = faiss.IndexIVFPQ(quantizer, d, lists, m, pq_bits, faiss.METRIC_INNER_PRODUCT)
            ivf.pq.cp.seed = seed
            train_size = max(train_size, _PQ_TRAIN_PER_CODE * 2**pq_bits)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        train = x
        if n > train_size:
            rng = np.random.default_rng(seed)
            train = x[np.sort(rng.choice(n, train_size, replace=False))]
        ivf.train(train)
        ivf.nprobe = min(nprobe, lists)
        index = ivf  # faiss's wrapper keeps a reference to the quantizer
    _add(index, x, ids, progress, kind)
    build_s = time.perf_counter() - started

    if kind == FLAT:
        recall = 1.0
    elif recall_queries > 0 and n > 0:
        queries = sample_queries(x, recall_queries, seed)
        recall = recall_at_k(index, x, queries, recall_k, ids=ids)
    else:
        recall = math.nan
    if not math.isnan(recall):
        INDEX_RECALL.set(recall)
    log.info(
        "built %s index over %d vectors (d=%d) in %.2fs, recall@%d=%.4f",
        kind,
        n,
        d,
        build_s,
        recall_k,
        recall,
        extra={"index_kind": kind, "n_vectors": n, "build_s": round(build_s, 3), "recall": recall},
    )
    return index


def index_kind(index: faiss.Index) -> str:
    """``flat``, ``hnsw``, ``ivf`` or ``ivfpq`` for an index built here (also after deserializing)."""
    inner = unwrapped(index)
    if isinstance(inner, faiss.IndexHNSW):
        return HNSW
    if isinstance(inner, faiss.IndexIVFPQ):
        return IVFPQ
    if isinstance(inner, faiss.IndexIVF):
        return IVF
    if isinstance(inner, faiss.IndexFlat):
        return FLAT
    raise IndexBuildError(f"not an index built by the publisher: {type(inner).__name__}")


def supports_remove(index: faiss.Index) -> bool:
    """Whether ``index.remove_ids`` works (flat, IVF and IVF-PQ: yes; HNSW: no)."""
    return index_kind(index) != HNSW


def sample_queries(vectors: np.ndarray, count: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """Unit query vectors near the data: sampled vectors plus Gaussian noise, renormalised.

    Querying with the stored vectors themselves would flatter an approximate index (each
    query finds itself); the noise (``noise`` times the vector norm, spread over all
    dimensions) makes the check closer to user vectors that lie between items.
    """
    rng = np.random.default_rng(seed)
    n, d = vectors.shape
    picks = vectors[rng.integers(0, n, size=min(count, max(n, 1)))]
    q = picks + rng.normal(0.0, noise / math.sqrt(d), size=picks.shape).astype(np.float32)
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    return (q / np.maximum(norms, 1e-12)).astype(np.float32)


def recall_at_k(
    index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int, ids: np.ndarray | None = None
) -> float:
    """Fraction of the exact top-``k`` (by inner product) that ``index`` returns.

    Args:
        index: the index under test, holding ``vectors`` under ``ids``.
        vectors: ``[n, d]`` the indexed vectors.
        queries: ``[q, d]`` query vectors.
        k: list length compared (capped at ``n``).
        ids: the id of each vector in ``index``; ``None`` means row positions.

    Returns:
        ``|approx ∩ exact| / (q · min(k, n))``, 1.0 when there is nothing to find.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = x.shape[0]
    k = min(k, n)
    if k <= 0 or q.shape[0] == 0:
        return 1.0
    _, exact = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    if ids is not None:
        exact = np.asarray(ids, dtype=np.int64)[exact]
    _, found = index.search(q, k)
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True))
    return hits / (q.shape[0] * k)


def serialize(index: faiss.Index) -> bytes:
    """The index as bytes (``faiss.serialize_index``)."""
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    """Inverse of :func:`serialize`.

    Raises:
        IndexBuildError: the bytes are not a Faiss index.
    """
    if not data:
        raise IndexBuildError("empty index bytes")
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise IndexBuildError(f"not a faiss index: {str(exc).splitlines()[0][:200]}") from None
