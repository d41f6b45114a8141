"""The exact kNN search: every backend equals float64 brute force, under any memory budget."""

import warnings

import pytest
import torch

from targetgen import search
from targetgen.errors import ConfigError
from targetgen.search import NearestNeighbours, RunningNearest, knn, plan_chunks

BACKENDS = ["torch"] + (["faiss-cpu"] if search.faiss_installed() else [])


def brute_force(queries, database, k):
    d = torch.cdist(queries.double(), database.double()).pow(2)
    return torch.topk(d, k, dim=1, largest=False)


def assert_exact(queries, database, dist, idx, k):
    """Each returned neighbour is a true k-nearest one: its float64 distance is the
    true k-th-order distance up to float32 resolution (ties may swap), and the
    distances reported match float64 to float32 resolution."""
    true_d, true_i = brute_force(queries, database, k)
    got = (queries.double()[:, None, :] - database.double()[idx]).pow(2).sum(-1)
    scale = queries.double().pow(2).sum(1, keepdim=True) + database.double().pow(2).sum(1).max()
    resolution = 1e-5 * scale  # float32 ulp of the matmul form, with margin
    assert (got - true_d).abs().le(resolution).all()
    assert (dist.double() - true_d).abs().le(resolution).all()
    # and away from ties the indices are exactly the brute-force ones
    gaps = torch.diff(
        torch.cat([true_d, brute_force(queries, database, min(k + 1, len(database)))[0][:, -1:]], 1), dim=1
    )
    clear = (gaps > resolution).all(dim=1)
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], true_i[clear])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5])
def test_backends_equal_brute_force_in_one_chunk_and_in_many(backend, k):
    g = torch.Generator().manual_seed(0)
    queries, database = torch.randn(300, 37, generator=g), torch.randn(1000, 37, generator=g)
    for budget in (search.DEFAULT_BUDGET, 40_000):  # 40 kB forces dozens of chunks on both sides
        plan = plan_chunks(len(queries), len(database), 37, k, budget)
        if budget == 40_000:
            assert plan.queries < len(queries) and plan.database < len(database)
        dist, idx = knn(queries, database, k, backend, budget)
        assert dist.shape == idx.shape == (300, k)
        assert_exact(queries, database, dist, idx, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_images_are_flattened_and_exact_duplicates_found_at_distance_zero(backend):
    g = torch.Generator().manual_seed(1)
    database = torch.rand(200, 1, 8, 8, generator=g)
    dist, idx = knn(database[[5, 17, 199]], database, 1, backend)
    assert idx[:, 0].tolist() == [5, 17, 199]
    assert dist.abs().max() < 1e-5


def test_backends_agree_with_each_other():
    if len(BACKENDS) < 2:
        pytest.skip("faiss is not installed: only the torch backend is present")
    g = torch.Generator().manual_seed(2)
    queries, database = torch.randn(500, 64, generator=g), torch.randn(3000, 64, generator=g)
    (d1, i1), (d2, i2) = (knn(queries, database, 3, b, 100_000) for b in BACKENDS)
    assert (i1 != i2).float().mean() < 0.01  # only float32 ties may differ
    assert torch.allclose(d1, d2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape", [(10, 10, 3, 1), (100_000, 2_000_000, 12_288, 1), (7, 5, 784, 4), (4096, 60_000, 784, 10)]
)
def test_chunk_plan_respects_the_memory_budget(shape):
    nq, nd, dim, k = shape
    for budget in (10**6, 64 * 1024**2, search.DEFAULT_BUDGET):
        plan = plan_chunks(nq, nd, dim, k, budget)
        assert 1 <= plan.queries <= nq and 1 <= plan.database <= nd
        assert plan.working_bytes(dim, k) <= budget


def test_a_budget_too_small_is_refused_with_the_numbers():
    with pytest.raises(ConfigError, match="memory_budget: 1000 bytes is too small to search 12288-dimensional"):
        plan_chunks(10, 10, 12_288, 1, 1000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_database_equals_one_search(backend):
    g = torch.Generator().manual_seed(3)
    queries, database = torch.randn(50, 16, generator=g), torch.randn(900, 16, generator=g)
    running = RunningNearest(queries, backend)
    for start in range(0, 900, 128):
        improved, position = running.update(database[start : start + 128])
        assert len(position) == int(improved.sum())
    dist, idx = knn(queries, database, 1, backend)
    assert torch.equal(running.index, idx[:, 0])
    assert torch.allclose(running.distance, dist[:, 0])


def test_bad_queries_and_k_are_named():
    index = NearestNeighbours(torch.randn(10, 4), "torch")
    with pytest.raises(ConfigError, match="expected 4-dimensional vectors, got 3"):
        index.search(torch.randn(2, 3))
    with pytest.raises(ConfigError, match=r"expected 1 <= k <= 10 \(the database size\), got 11"):
        index.search(torch.randn(2, 4), 11)
    with pytest.raises(ConfigError, match="expected one of auto, faiss-gpu, faiss-cpu, torch, got 'cuda'"):
        NearestNeighbours(torch.randn(10, 4), "cuda")


def test_without_a_gpu_no_gpu_api_is_touched(monkeypatch):
    if not search.faiss_installed():
        pytest.skip("faiss is not installed")
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a GPU")

    def forbidden(*args, **kwargs):
        raise AssertionError("a FAISS GPU API was called on a machine without a GPU")

    for name in ("knn_gpu", "StandardGpuResources", "index_cpu_to_gpu", "index_cpu_to_all_gpus"):
        monkeypatch.setattr(faiss, name, forbidden, raising=False)
    assert search.resolve_backend("auto") == "faiss-cpu"
    knn(torch.randn(20, 8), torch.randn(30, 8))
    with pytest.raises(ConfigError, match="no GPU visible to faiss"):
        search.resolve_backend("faiss-gpu")


def test_without_faiss_the_torch_fallback_is_announced_once(monkeypatch):
    monkeypatch.setattr(search, "faiss_installed", lambda: False)
    monkeypatch.setattr(search, "_announced_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert search.resolve_backend("auto") == "torch"
        assert search.resolve_backend("auto") == "torch"
    assert [str(w.message) for w in caught if "faiss is not installed" in str(w.message)].__len__() == 1
    with pytest.raises(ConfigError, match="faiss is not installed"):
        search.resolve_backend("faiss-cpu")
