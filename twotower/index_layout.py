"""How a snapshot's Faiss index is put together, for every stage that looks inside one.

The publisher builds it (``publisher/index.py``): flat and HNSW indexes are wrapped in an id map
(``IndexIDMap2``, ids are row positions), IVF kinds carry the ids themselves, and an HNSW graph
keeps the vectors it compares in a storage index of its own (float32, or float16 codes). The
retriever reads the wrapped index's search parameters and storage; the benchmarks change its
stored codes.
"""

from __future__ import annotations

import faiss


def unwrapped(index: faiss.Index) -> faiss.Index:
    """The index an id map wraps (the publisher's flat and HNSW indexes), else ``index`` itself."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def vector_storage(index: faiss.Index) -> faiss.Index:
    """The index that holds the vectors: an HNSW graph's storage, else :func:`unwrapped`."""
    inner = unwrapped(index)
    return faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner


__all__ = ["unwrapped", "vector_storage"]
