"""The shared training harness: seeds, ensembling, checkpoints, the generic loop."""

import numpy as np
import pytest
import torch

from histosr import train

torch.set_num_threads(2)


def test_state_seeds_deterministic_distinct_prefix_stable():
    a = train.state_seeds(0, 5)
    assert a == train.state_seeds(0, 5)
    assert len(set(a)) == 5
    assert train.state_seeds(0, 3) == a[:3]
    assert train.state_seeds(1, 5) != a
    with pytest.raises(ValueError):
        train.state_seeds(0, 0)


def test_seed_everything_reproduces_all_rngs():
    import random

    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    train.seed_everything(7)
    x = draw()
    train.seed_everything(7)
    assert draw() == x
    train.seed_everything(8)
    assert draw() != x
    assert torch.are_deterministic_algorithms_enabled()


def test_resolve_device():
    assert train.resolve_device("cpu").type == "cpu"
    assert train.resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            train.resolve_device("cuda")
    with pytest.raises((ValueError, RuntimeError)):
        train.resolve_device("mps")


def test_median_over_states():
    a, b, c = np.zeros((2, 3)), np.ones((2, 3)), np.full((2, 3), 5.0)
    np.testing.assert_array_equal(train.median_over_states([c, a, b]), b)
    np.testing.assert_array_equal(train.median_over_states([a, b]), np.full((2, 3), 0.5))
    one = train.median_over_states([torch.ones(2)])
    assert one.dtype == np.float32 and one.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        train.median_over_states([])


def _fit_one(seed):
    return {"seed": seed, "value": torch.rand(4)}  # RNG already seeded by fit_states


def test_fit_states_seeds_each_state():
    states = train.fit_states(_fit_one, 3, seed=0)
    again = train.fit_states(_fit_one, 3, seed=0)
    assert [s["seed"] for s in states] == train.state_seeds(0, 3)
    for s, t in zip(states, again):
        assert torch.equal(s["value"], t["value"])
    assert not torch.equal(states[0]["value"], states[1]["value"])


def test_fit_states_resumes_after_kill(tmp_path):
    calls = []

    def dies_at_third(seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed while training state 2
        return _fit_one(seed)

    with pytest.raises(KeyboardInterrupt):
        train.fit_states(dies_at_third, 4, seed=1, checkpoint_dir=tmp_path, key="k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-000.pt", "state-001.pt"]

    calls.clear()
    resumed = train.fit_states(lambda s: calls.append(s) or _fit_one(s), 4, seed=1,
                               checkpoint_dir=tmp_path, key="k")
    seeds = train.state_seeds(1, 4)
    assert calls == seeds[2:]  # finished states are not retrained
    full = train.fit_states(_fit_one, 4, seed=1)
    for s, t in zip(resumed, full):
        assert s["seed"] == t["seed"] and torch.equal(s["value"], t["value"])

    calls.clear()  # another key (changed data/params) retrains everything
    train.fit_states(lambda s: calls.append(s) or _fit_one(s), 4, seed=1,
                     checkpoint_dir=tmp_path, key="other")
    assert calls == seeds


def test_train_loop_learns_and_is_deterministic():
    x = torch.linspace(-1, 1, 64)[:, None]
    y = 3 * x - 1

    def run():
        train.seed_everything(0)
        model = torch.nn.Linear(1, 1)
        gen = torch.Generator().manual_seed(0)

        def batches(epoch):
            perm = torch.randperm(64, generator=gen)
            for a in range(0, 64, 16):
                yield x[perm[a:a + 16]], y[perm[a:a + 16]]

        def loss_fn(m, batch):
            return ((m(batch[0]) - batch[1]) ** 2).mean()

        hist = train.train_loop(model, batches, loss_fn, epochs=60, lr=0.05, progress=False)
        return hist, model.weight.item()

    h1, w1 = run()
    h2, w2 = run()
    assert h1 == h2 and w1 == w2
    assert h1[-1] < 0.01 * h1[0] and abs(w1 - 3) < 0.1
    with pytest.raises(ValueError, match="optimizer"):
        train.make_optimizer(torch.nn.Linear(1, 1).parameters(), "lbfgs")


def test_digest():
    import scipy.sparse as sp

    from histosr.keys import digest, jsonable

    a = np.arange(6.0)
    assert digest({"a": 1}, a) == digest({"a": 1}, a.copy())
    assert digest({"a": 1}, a) != digest({"a": 2}, a)
    assert digest(a) != digest(a.reshape(2, 3)) and digest(a) != digest(a.astype(np.float32))
    assert digest(sp.csr_matrix(a.reshape(2, 3))) == digest(sp.csc_matrix(a.reshape(2, 3)))
    assert jsonable({"x": np.float32(1.5), 2: (np.int64(3),)}) == {"x": 1.5, "2": [3]}


def test_damaged_checkpoint_is_retrained(tmp_path):
    train.fit_states(_fit_one, 1, seed=1, checkpoint_dir=tmp_path, key="k")
    (tmp_path / "state-000.pt").write_bytes(b"garbage")  # truncated / foreign: not loaded
    calls = []
    train.fit_states(lambda s: calls.append(s) or _fit_one(s), 1, seed=1,
                     checkpoint_dir=tmp_path, key="k")
    assert calls == train.state_seeds(1, 1)


def _member(seed):
    """A tiny two-layer model on a planted linear target, with its own seeded batches."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    Y = X[:, :2] * 2.0 - X[:, 2:4]

    def batches(epoch):
        perm = torch.randperm(40, generator=gen)
        for a in range(0, 40, 8):
            yield X[perm[a:a + 8]], Y[perm[a:a + 8]]

    return model, batches


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_members_trained_batched_equal_one_after_the_other():
    seeds = [3, 11, 29]
    alone = [train.train_member(*_member(s), _mse, 6, 1e-2, False) for s in seeds]
    members = [_member(s) for s in seeds]
    together = train.train_members_batched([m for m, _ in members], [b for _, b in members],
                                           _mse, 6, 1e-2, False)
    for a, t in zip(alone, together):
        assert a["model"].keys() == t["model"].keys()
        for k in a["model"]:
            torch.testing.assert_close(t["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t["loss"], a["loss"], rtol=1e-5)
        assert t["loss"][-1] < 0.8 * t["loss"][0]  # it trained
    # distinct members stay distinct (no parameter shared across the stack)
    assert not torch.allclose(together[0]["model"]["0.weight"], together[1]["model"]["0.weight"])
    with pytest.raises(ValueError, match="clip_grad_norm couples the members"):
        train.train_members_batched([m for m, _ in members], [b for _, b in members], _mse,
                                    1, 1e-2, False, clip_grad_norm=1.0)


def test_fit_states_trains_missing_members_together(tmp_path):
    calls = []

    def fit_one(seed):
        calls.append(("one", seed))
        return {"model": {"w": torch.tensor([seed])}, "loss": [0.0]}

    def fit_together(seeds):
        calls.append(("together", tuple(seeds)))
        return [{"model": {"w": torch.tensor([s])}, "loss": [0.0]} for s in seeds]

    seeds = train.state_seeds(5, 3)
    st = train.fit_states(fit_one, 3, 5, tmp_path, key="k", fit_together=fit_together)
    assert calls == [("together", tuple(seeds))]
    assert [int(s["model"]["w"]) for s in st] == seeds
    (tmp_path / "state-001.pt").unlink()  # one member lost: retrained alone
    calls.clear()
    train.fit_states(fit_one, 3, 5, tmp_path, key="k", fit_together=fit_together)
    assert calls == [("one", seeds[1])]


def test_count_flops_matches_a_hand_count():
    from histosr.benchmark.speed import count_flops, matmul_probe

    lin = torch.nn.Linear(10, 20)
    x = torch.randn(7, 10)
    with count_flops() as fc:
        lin(x).sum().backward()
    # forward x W^T: 2 * 7 * 10 * 20; backward: the weight gradient, as much again (x needs
    # no gradient); bias and sum are element-wise (not counted)
    assert fc["total"] == 2 * (2 * 7 * 10 * 20)
    assert matmul_probe("cpu", seconds=0.05, n=128) > 1e6
