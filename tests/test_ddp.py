"""Data-parallel training (PyTorch DDP, as under torchrun) with 2 gloo CPU processes."""

import os
import socket

import numpy as np
import pytest
import torch

from histosr import train


def _gloo_ok() -> bool:
    d = getattr(torch, "distributed", None)
    return bool(d and d.is_available() and d.is_gloo_available())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One torchrun-like rank: env vars as torchrun sets them, then the shared harness."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)  # the same data on every rank
    X = torch.from_numpy(rng.normal(size=(100, 5)).astype(np.float32))
    Y = X @ torch.from_numpy(rng.normal(size=(5, 2)).astype(np.float32))
    seen = []

    def fit_one(seed):
        gen = torch.Generator().manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 2))

        def batches(epoch):
            perm = torch.randperm(len(X), generator=gen)
            for a in range(0, len(X), 16):  # 7 batches: the last group of 2 is short
                idx = perm[a: a + 16]
                yield X[idx], Y[idx], idx

        def loss_fn(m, batch):
            x, y, idx = batch
            seen.append(idx)
            return ((m(x) - y) ** 2).mean()

        return train.train_member(model, batches, loss_fn, 15, 2e-2, False)

    states = train.fit_states(fit_one, 1, seed=0, checkpoint_dir=os.path.join(out, "ckpt"))
    own = torch.cat(seen[:4]).numpy()  # this rank's spots in epoch 0 (4 of 7 batches)
    torch.save({"state": states[0]["model"], "loss": states[0]["loss"], "epoch0": own},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not _gloo_ok(), reason="torch.distributed with the gloo backend is "
                    "unavailable in this PyTorch build")
def test_ddp_two_ranks_agree(tmp_path):
    import torch.multiprocessing as mp

    # fork (Linux) skips re-importing torch in each child, as DataLoader workers do
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # identical weights on both ranks
    assert r0["loss"] == r1["loss"]  # the history is the mean over ranks
    assert r0["loss"][-1] < 0.5 * r0["loss"][0]  # it trained
    # ranks saw disjoint spots (apart from the padded last batch)
    first0, first1 = set(r0["epoch0"][:48].tolist()), set(r1["epoch0"][:48].tolist())
    assert not first0 & first1 and len(first0) == len(first1) == 48
    # only rank 0 writes the checkpoint
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["state-000.pt"]
    assert not train.is_main_process() or train.distributed_env() is None
