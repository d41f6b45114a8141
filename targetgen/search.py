"""Exact k-nearest-neighbour search (squared L2) under a memory budget.

Three backends give the same answer (up to ties at float32 resolution):

* ``faiss-gpu`` — FAISS on one or all GPUs; chosen by ``auto`` only when
  ``faiss.get_num_gpus() > 0``. No GPU API is touched otherwise: on a machine
  without a GPU, ``faiss.knn_gpu`` aborts the whole interpreter.
* ``faiss-cpu`` — FAISS's exact flat-L2 search (the ``cpu`` extra).
* ``torch`` — chunked matmul, used when faiss is not installed (announced once).

Both the queries and the database are cut into chunks, and a running top-k is
kept over database chunks, so the working memory of a search stays under
``memory_budget`` bytes however large either side is. ``NearestNeighbours``
keeps a database indexed for repeated searches; ``RunningNearest`` serves
callers that stream the database chunk by chunk (IMLE's generated pool, which
is never held in memory whole).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import ConfigError

Backend = Literal["auto", "faiss-gpu", "faiss-cpu", "torch"]
BACKENDS = ("auto", "faiss-gpu", "faiss-cpu", "torch")
DEFAULT_BUDGET = 2 * 1024**3  # bytes
_BYTES = 4  # float32

_announced_fallback = False


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def gpu_count() -> int:
    """GPUs FAISS can use; 0 when faiss is absent or is the CPU build."""
    if not faiss_installed():
        return 0
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend for ``backend``; a clear error when it cannot run here."""
    global _announced_fallback
    if backend not in BACKENDS:
        raise ConfigError(f"search backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if gpu_count() > 0:
            return "faiss-gpu"
        if faiss_installed():
            return "faiss-cpu"
        if not _announced_fallback:
            _announced_fallback = True
            warnings.warn(
                "faiss is not installed: nearest-neighbour search uses the slower pure-torch backend "
                "(install targetgen[cpu] or targetgen[gpu] for FAISS)",
                stacklevel=2,
            )
        return "torch"
    if backend in ("faiss-cpu", "faiss-gpu") and not faiss_installed():
        raise ConfigError(
            f"search backend {backend!r}: faiss is not installed (pip install 'targetgen[cpu]' or '[gpu]')"
        )
    if backend == "faiss-gpu" and gpu_count() == 0:
        raise ConfigError("search backend 'faiss-gpu': no GPU visible to faiss (faiss.get_num_gpus() == 0)")
    return backend


@dataclass(frozen=True)
class ChunkPlan:
    queries: int  # queries per chunk
    database: int  # database vectors per chunk

    def working_bytes(self, dim: int, k: int) -> int:
        """Peak extra memory of one chunk pair: the two float32 copies, the
        distance block, and the running and new top-k (distances + int64 ids)."""
        q, b = self.queries, self.database
        return _BYTES * (q * dim + b * dim + q * b) + 2 * q * k * (_BYTES + 8) * 2


def plan_chunks(n_queries: int, n_database: int, dim: int, k: int, memory_budget: int) -> ChunkPlan:
    """The largest chunks whose working memory fits ``memory_budget`` bytes.

    A quarter of the budget goes to the query chunk, the rest is shared by
    the database chunk and the query × database distance block.
    """
    q = max(1, min(n_queries, memory_budget // 4 // (_BYTES * dim + 4 * k * (_BYTES + 8))))
    rest = memory_budget - ChunkPlan(q, 0).working_bytes(dim, k)
    b = min(n_database, max(0, rest // (_BYTES * (dim + q))))
    plan = ChunkPlan(q, b)
    if b < 1 or plan.working_bytes(dim, k) > memory_budget:
        raise ConfigError(
            f"memory_budget: {memory_budget} bytes is too small to search {dim}-dimensional vectors "
            f"(need at least {ChunkPlan(1, 1).working_bytes(dim, k)} bytes)"
        )
    return plan


def _as_matrix(x: Tensor, name: str) -> Tensor:
    if x.dim() != 2:
        x = x.reshape(len(x), -1)
    if not torch.is_floating_point(x):
        raise ConfigError(f"nearest-neighbour {name}: expected floating-point vectors, got {x.dtype}")
    return x.detach().to("cpu", torch.float32).contiguous()


def _merge(best_d: Tensor, best_i: Tensor, new_d: Tensor, new_i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Running top-k. A stable sort keeps the earlier (lower-index) neighbour on ties."""
    d = torch.cat([best_d, new_d], dim=1)
    i = torch.cat([best_i, new_i], dim=1)
    d, order = torch.sort(d, dim=1, stable=True)
    return d[:, :k], torch.gather(i, 1, order[:, :k])


class _TorchChunk:
    def __init__(self, vectors: Tensor):
        self.vectors = vectors
        self.sq_norms = vectors.pow(2).sum(1)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        # ‖q − b‖² = ‖q‖² + ‖b‖² − 2 q·b, the matmul form FAISS uses too
        dist = torch.addmm(self.sq_norms.unsqueeze(0), queries, self.vectors.T, alpha=-2.0)
        dist.add_(queries.pow(2).sum(1, keepdim=True)).clamp_(min=0.0)
        k = min(k, dist.size(1))
        d, i = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        return d, i


class _FaissChunk:
    """FAISS's exact flat-L2 kernel (the one behind ``IndexFlatL2.search``).

    On CPU it is called as ``faiss.knn`` on the chunk in place: building an
    ``IndexFlatL2`` would copy the database first (measured: 3 s per GB, as
    long as the search itself at d = 12,288).
    """

    def __init__(self, vectors: Tensor, gpu: bool, all_gpus: bool):
        import faiss

        self.vectors = vectors
        self.index = None
        if gpu:  # reached only when faiss.get_num_gpus() > 0 (see resolve_backend)
            index = faiss.IndexFlatL2(vectors.size(1))
            if all_gpus:
                index = faiss.index_cpu_to_all_gpus(index)
            else:
                self._resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._resources, 0, index)
            index.add(vectors.numpy())
            self.index = index

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        import faiss

        k = min(k, len(self.vectors))
        if self.index is not None:
            d, i = self.index.search(queries.numpy(), k)
        else:
            d, i = faiss.knn(queries.numpy(), self.vectors.numpy(), k)
        return torch.from_numpy(d), torch.from_numpy(i)


class NearestNeighbours:
    """An exact index over ``database`` (N×d, or N×… flattened), searched repeatedly.

    The database is held once, cut into chunks of the planned size; searches
    cut the queries into chunks and keep a running top-k over database chunks.
    """

    def __init__(
        self,
        database: Tensor,
        backend: Backend = "auto",
        memory_budget: int = DEFAULT_BUDGET,
        max_queries: int | None = None,
        k: int = 1,
        all_gpus: bool = False,
    ):
        database = _as_matrix(database, "database")
        if len(database) == 0:
            raise ConfigError("nearest-neighbour database: it is empty")
        self.backend = resolve_backend(backend)
        self.dim = database.size(1)
        self.size = len(database)
        self.memory_budget = int(memory_budget)
        self.plan = plan_chunks(max_queries or self.size, self.size, self.dim, k, self.memory_budget)
        self.chunks = []
        for start in range(0, self.size, self.plan.database):
            part = database[start : start + self.plan.database]
            if self.backend == "torch":
                self.chunks.append((start, _TorchChunk(part)))
            else:
                self.chunks.append((start, _FaissChunk(part, self.backend == "faiss-gpu", all_gpus)))

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Squared L2 distances (float32) and int64 indices of the k nearest, each N×k, nearest first."""
        queries = _as_matrix(queries, "queries")
        if queries.size(1) != self.dim:
            raise ConfigError(
                f"nearest-neighbour queries: expected {self.dim}-dimensional vectors, got {queries.size(1)}"
            )
        if not 1 <= k <= self.size:
            raise ConfigError(f"nearest-neighbour k: expected 1 <= k <= {self.size} (the database size), got {k}")
        plan = plan_chunks(len(queries), self.plan.database, self.dim, k, self.memory_budget)
        out_d, out_i = [], []
        for q0 in range(0, len(queries), plan.queries):
            q = queries[q0 : q0 + plan.queries]
            best_d = torch.full((len(q), 0), float("inf"))
            best_i = torch.zeros((len(q), 0), dtype=torch.int64)
            for start, chunk in self.chunks:
                d, i = chunk.search(q, k)
                best_d, best_i = _merge(best_d, best_i, d, i + start, k)
            out_d.append(best_d)
            out_i.append(best_i)
        return torch.cat(out_d), torch.cat(out_i)


def knn(
    queries: Tensor, database: Tensor, k: int = 1, backend: Backend = "auto", memory_budget: int = DEFAULT_BUDGET
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours of every query in ``database`` (squared L2)."""
    index = NearestNeighbours(database, backend, memory_budget, max_queries=len(queries), k=k)
    return index.search(queries, k)


class RunningNearest:
    """The nearest database vector of every query, with the database streamed in chunks.

    ``update(chunk)`` searches the queries in one more database chunk and
    returns which queries found a nearer neighbour there, and its position in
    the chunk, so that callers can keep per-query payloads (IMLE keeps the
    winning latent) without ever holding the whole database.
    """

    def __init__(self, queries: Tensor, backend: Backend = "auto", memory_budget: int = DEFAULT_BUDGET):
        self.queries = _as_matrix(queries, "queries")
        self.backend = resolve_backend(backend)
        self.memory_budget = memory_budget
        self.distance = torch.full((len(self.queries),), float("inf"))
        self.index = torch.full((len(self.queries),), -1, dtype=torch.int64)
        self.seen = 0  # database vectors searched so far

    def update(self, chunk: Tensor, offset: int | None = None) -> tuple[Tensor, Tensor]:
        """Returns (improved: bool mask over queries, position in ``chunk`` for those).

        ``offset``: the chunk's position in the whole database (default: right
        after the chunks seen so far), for callers that see only some chunks.
        """
        index = NearestNeighbours(chunk, self.backend, self.memory_budget, max_queries=len(self.queries))
        d, i = index.search(self.queries, 1)
        d, i = d[:, 0], i[:, 0]
        improved = d < self.distance  # strict: ties keep the earlier neighbour
        self.distance[improved] = d[improved]
        self.index[improved] = i[improved] + (self.seen if offset is None else offset)
        self.seen += len(chunk)
        return improved, i[improved]
