"""Two nodes of one rank each, simulated on this machine through ``launch/slurm.sbatch``:
the batch script runs as SLURM would run it, with stand-ins for ``srun`` (one task per node,
all at once, each with its SLURM_NODEID) and ``scontrol`` (the allocation's host names) in
tests/slurm_stubs/. Each node's task runs DeepSpeed's launcher with ``--no_ssh --node_rank
N`` and a hostfile of two hosts; the ranks meet over TCP as on a cluster (DeepSpeed's
shared-memory all-reduce is only for ranks of one node).

Same losses as one node with two ranks; one checkpoint directory per job, written by both
nodes; a job stopped half-way and submitted again resumes from it across both nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT, VENV_BIN, digits_fd_job, env, free_port, run_deepspeed, write_spec

pytestmark = pytest.mark.distributed

STEPS = 4
STUBS = ROOT / "tests" / "slurm_stubs"


def sbatch(spec: Path, logs: Path, *extra: str, timeout: int = 300) -> list[str]:
    """``launch/slurm.sbatch SPEC`` on a 2-node "allocation" of 1 GPU (here: rank) each;
    returns each node's output. Fails the test if the job fails."""
    logs.mkdir(parents=True)
    port = free_port()
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_ID": str(port), "SLURM_JOB_NODELIST": "node[0-1]",
             "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(ROOT),
             "DISTILL_HOSTFILE_DIR": str(logs), "DISTILL_MASTER_PORT": str(port),
             "DISTILL_MASTER_ADDR": "127.0.0.1",  # node0 names no machine here
             "STUB_LOG_DIR": str(logs),
             "PATH": os.pathsep.join([str(STUBS), str(VENV_BIN), os.environ["PATH"]])}
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), str(spec), *extra],
                            capture_output=True, text=True, cwd=ROOT, env={**env(), **slurm},
                            timeout=timeout)
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink(missing_ok=True)
    outputs = [(logs / f"node{n}.log").read_text() for n in (0, 1)]
    assert result.returncode == 0, (result.stderr[-2000:], [o[-3000:] for o in outputs])
    assert (logs / f"hostfile.{port}").read_text() == "node0 slots=1\nnode1 slots=1\n"
    return outputs


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "fd" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_shards, teacher_file) -> dict:
    work = tmp_path_factory.mktemp("multinode")

    def spec(run_dir: Path) -> Path:
        return write_spec(run_dir.with_suffix(".yaml"), digits_fd_job(
            run_dir, digits_shards / "train", teacher_file, STEPS, name="multinode", seed=5,
            data={"num_workers": 0}, optimisation={"grad_clip": 3.0},
            checkpointing={"every_steps": STEPS // 2, "keep": 2}, logging={"plot": False}))

    one_node = work / "one_node"
    result = run_deepspeed(spec(one_node), ranks=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two_nodes = work / "two_nodes"
    sbatch(spec(two_nodes), work / "logs_first", "--stop-after", str(STEPS // 2))
    second = sbatch(spec(two_nodes), work / "logs_second")
    return {"one_node": one_node, "two_nodes": two_nodes,
            "output": second}


def test_two_nodes_learn_exactly_what_one_node_with_two_ranks_learns(runs):
    assert losses(runs["two_nodes"]) == pytest.approx(losses(runs["one_node"]), rel=1e-5)


def test_the_job_has_one_checkpoint_per_save_holding_both_nodes_ranks(runs):
    checkpoints = runs["two_nodes"] / "fd" / "checkpoints"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert tags == [f"step{STEPS // 2:08d}", f"step{STEPS:08d}"], tags
    for tag in tags:
        assert (checkpoints / tag / "COMPLETE").is_file()
        assert sorted(p.name for p in (checkpoints / tag).glob("rng_rank*.pt")) == \
            ["rng_rank0.pt", "rng_rank1.pt"]


def test_a_job_stopped_on_two_nodes_resumes_across_them(runs):
    node0, node1 = runs["output"]
    assert f"resumed from step{STEPS // 2:08d}" in node0, node0[-3000:]
    # The launcher of node 1 ran its rank as global rank 1 of 2.
    assert "node_rank=1" in node1 and "dist_world_size=2" in node1, node1[-3000:]
