"""train.py across ranks and nodes: two torchrun agents on localhost stand in for two nodes (c10d rendezvous,
gloo); a one-process test proves nothing about ranks (docs/DESIGN.md §8).

- A resumed 2-rank run with mixup/cutmix ends bitwise equal to the uninterrupted one (every rank restores
  its own RNG states).
- Node-local run directories (each agent in its own folder, the same relative --out) stop every rank at
  once with an error naming the ranks and hosts, fresh or resumed: never a hang, never a silent divergence.
- Initial weights are equal on every rank; the training draws (masks, dropout) differ between ranks.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
TINY = ["--arch", "crate_tiny", "--data", "synthetic", "--synthetic-steps", "3", "--img-size", "16", "--patch-size",
        "4", "--batch-size", "8", "--workers", "1", "--log-every", "1000", "--epochs", "2", "--mixup", "0.8",
        "--cutmix", "1.0", "--warmup-epochs", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def two_nodes(flags: list[str], cwds: tuple[str, str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """train.py under two torchrun agents (one process each) with c10d rendezvous on localhost; the
    second agent starts first, so global rank 0 lands on whichever joins first, as on a real cluster."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=0", TRAIN, *flags]
    procs = []
    for cwd in reversed(cwds):
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        time.sleep(1)
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("the two-node run hung") from None
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout))
    return out


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_node_resume_is_exact_and_node_local_run_dirs_stop_at_once(tmp_path):
    shared = str(tmp_path)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    for p in two_nodes(TINY + ["--out", full], (shared, shared)):
        assert p.returncode == 0, p.stdout[-3000:]
    for p in two_nodes(TINY + ["--out", split, "--stop-after", "1"], (shared, shared)):
        assert p.returncode == 0, p.stdout[-3000:]
    # node A's disk holds the run after epoch 1; node B's holds nothing
    node_a, node_b = tmp_path / "nodeA", tmp_path / "nodeB"
    shutil.copytree(split, node_a / "run")
    node_b.mkdir()
    for p in two_nodes(TINY + ["--out", split, "--resume", "auto"], (shared, shared)):
        assert p.returncode == 0, p.stdout[-3000:]
    a, b = rows(full), rows(split)
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        for k in ("train_loss", "val_loss", "val_top1", "lr", "step"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
    ca = torch.load(os.path.join(full, "last.pt"), weights_only=True)
    cb = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert all(torch.equal(v, cb["model"][k]) for k, v in ca["model"].items())
    assert len(cb["rng"]) == 2                                   # every rank's RNG states
    # node-local run directories: a clear error on every rank within a minute
    t0 = time.monotonic()
    procs = two_nodes(TINY + ["--out", "run", "--resume", "auto"], (str(node_a), str(node_b)), timeout=120)
    assert time.monotonic() - t0 < 90
    for p in procs:
        assert p.returncode != 0
    text = "\n".join(p.stdout for p in procs)
    assert "--out must be on a file system every node shares" in text and "rank 1 on" in text, text[-3000:]
    assert not (node_b / "run" / "last.pt").exists()


WORKER = r"""
import sys, torch, torch.distributed as tdist
sys.path.insert(0, {root!r})
import train
from crate_fast.training import dist

cfg = train.resolve(train.TrainConfig(arch="mae_crate_tiny", data="synthetic", img_size=16, patch_size=4,
                                      batch_size=8, synthetic_steps=2, workers=1, out={out!r}))
ranks = dist.setup(cfg.device)
trainer = train.Trainer(cfg, ranks)
weights = sum(float(v.double().sum()) for v in trainer.model.state_dict().values())
_, mask, _ = trainer.model.random_masking(torch.zeros(4, 16, 8), 0.75)
drop = torch.nn.functional.dropout(torch.ones(64), 0.5)
seen = dist.all_gather_object((weights, mask, drop))
if ranks.rank == 0:
    (w0, m0, d0), (w1, m1, d1) = seen
    print("weights equal:", w0 == w1, "masks equal:", torch.equal(m0, m1), "dropout equal:", torch.equal(d0, d1))
tdist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_start_from_equal_weights_and_draw_their_own_masks_and_dropout(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT, out=str(tmp_path / "run")))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "weights equal: True masks equal: False dropout equal: False" in p.stdout, p.stdout


def test_workers_default_to_the_nodes_cores_shared_by_its_ranks(monkeypatch):
    sys.path.insert(0, ROOT)
    import train
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train.resolve(train.TrainConfig(data="synthetic")).workers == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert train.resolve(train.TrainConfig(data="synthetic")).workers == 16
