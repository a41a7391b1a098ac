"""launch/slurm.sbatch on a real 2-node SLURM cluster (tests/cluster/harness.py: two slurmd in network and UTS
namespaces of this machine), 1 gloo rank per node, the tiny preset with a random-init model and shards packed here.

Two jobs run side by side with the same config: a reference, left alone, and one that gets SLURM's preemption signal
(`scancel --signal=USR1`, what `--signal=USR1@120` sends before the time limit) mid-run. The second must checkpoint,
exit 75, requeue itself, resume from the checkpoint and end with exactly the reference's losses.

    make test-cluster        (root; skipped, with the reason, only where namespaces cannot be created)
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from data_prep.pack import pack
from data_prep.tokenizer import train_sentencepiece
from longctx import checkpoint
from longctx.config import PrepConfig, from_dict
from longctx.trainer import PREEMPTED_EXIT_CODE

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import SlurmCluster, namespace_support, wait_until  # noqa: E402
from prep_fixtures import synthetic_docs, write_text_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm.sbatch"
PRESET = ROOT / "launch" / "presets" / "tiny-cpu.yaml"
VOCAB = 500
SEQ_LEN = 256
MAX_STEPS = 24
PREEMPT_AFTER_STEP = 3
# The tiny preset (LongLoRA stage: S²-Attn, PI, LoRA + embed/norm, ZeRO-3) on a random-init model small enough for CPU.
OVERRIDES = [
    "model.path=",
    "model.init={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    f"num_attention_heads: 4, num_key_value_heads: 2, vocab_size: {VOCAB}, max_position_embeddings: 64}}",
    "rope.original_context=64",
    "rope.factor=0",
    "attention.group_size=64",
    f"train.seq_len={SEQ_LEN}",
    f"train.max_steps={MAX_STEPS}",
    "train.warmup_steps=2",
    "train.save_every=0",
    "train.keep_last=2",
]
JOB_TIMEOUT_S = 300  # generous: the first DeepSpeed run on a fresh machine JIT-builds a CPU op (~2 min)


@pytest.fixture(scope="module")
def cluster():
    if reason := namespace_support():
        pytest.skip(reason)
    cluster = SlurmCluster(num_nodes=2)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    docs = write_text_dir(root / "text", synthetic_docs(80))
    train_sentencepiece(docs, VOCAB, root / "tok.model")
    prep = {"inputs": [str(root / "text")], "tokenizer": str(root / "tok.model"), "out": str(root / "shards")}
    pack(from_dict(PrepConfig, {**prep, "seq_len": SEQ_LEN, "num_workers": 1}), progress=False)
    return root / "shards" / "train"


def submit(cluster: SlurmCluster, name: str, run_dir: Path, shards: Path, job_log: Path) -> str:
    """sbatch launch/slurm.sbatch on 2 nodes × 1 task, logging to job_log; returns the job id."""
    overrides = [*OVERRIDES, f"data.train={shards}", f"train.output_dir={run_dir}"]
    submitted = cluster.command(
        "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--job-name={name}", f"--output={job_log}",
        str(SBATCH), str(PRESET), *overrides,
        cwd=ROOT,
        # The script runs $PYTHON on every node (this venv; the nodes share the filesystem). One thread per rank:
        # both jobs' 4 ranks share this machine's cores.
        env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return submitted.stdout.strip()


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def attempts(job_log: Path) -> list[str]:
    """The job log split at the script's "==== job J attempt K" headers (it is appended across requeues)."""
    return re.split(r"(?m)^(?===== job \d+ attempt \d+ \|)", job_log.read_text())[1:]


def outcome(job: dict[str, str]) -> tuple[str, str, str]:
    """(final state, exit code, number of requeues) of a job from `scontrol show job`."""
    return job["JobState"], job["ExitCode"], job["Restarts"]


def rank_hosts(text: str) -> dict[int, str]:
    """{rank: hostname} from the "rank R of W on HOST" line each task prints before it starts Python."""
    return {int(rank): host for rank, _, host in re.findall(r"rank (\d+) of (\d+) on (\S+)", text)}


@contextmanager
def reported_on_failure(cluster: SlurmCluster, *job_logs: Path):
    """On failure, print the job logs and the tails of slurmctld's and slurmd's logs (pytest shows them)."""
    try:
        yield
    except BaseException:
        for job_log in job_logs:
            text = job_log.read_text(errors="replace") if job_log.is_file() else "(not written)"
            print(f"---- {job_log}\n{text}")
        print(cluster.log_tails())
        raise


@pytest.mark.cluster
def test_two_node_job_preempted_requeues_and_resumes_to_the_losses_of_an_uninterrupted_job(cluster, shards, tmp_path):
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    reference_log, preempted_log = tmp_path / "reference.out", tmp_path / "preempted.out"
    with reported_on_failure(cluster, reference_log, preempted_log):
        reference = submit(cluster, "reference", reference_dir, shards, reference_log)
        preempted = submit(cluster, "preempted", preempted_dir, shards, preempted_log)

        def trained_some_steps():
            if cluster.job(preempted)["JobState"] not in ("PENDING", "RUNNING"):
                raise AssertionError(f"job {preempted} ended before it could be preempted: {cluster.job(preempted)}")
            return len(metrics(preempted_dir)) >= PREEMPT_AFTER_STEP

        wait_until(trained_some_steps, JOB_TIMEOUT_S, f"job {preempted} to train {PREEMPT_AFTER_STEP} steps", 0.05)
        cluster.command("scancel", "--signal=USR1", preempted)
        preempted_job = cluster.wait_for_job_end(preempted, JOB_TIMEOUT_S)
        reference_job = cluster.wait_for_job_end(reference, JOB_TIMEOUT_S)

        # (a) The uninterrupted job: rank 0 on node1 and rank 1 on node2, one training run of world size 2.
        assert outcome(reference_job) == ("COMPLETED", "0:0", "0")
        reference_text = reference_log.read_text()  # strict UTF-8: no progress bars cut into pieces by srun
        assert rank_hosts(reference_text) == {0: "node1", 1: "node2"}, reference_text
        assert "on 2 rank(s)" in reference_text and "| 2 × 1 tasks" in reference_text
        assert f"rendezvous {cluster.node_address('node1')}:" in reference_text  # over the namespaces' bridge
        expected = metrics(reference_dir)
        assert [row["step"] for row in expected] == list(range(1, MAX_STEPS + 1))

        # (b) The preempted job: attempt 1 checkpointed a step mid-run and exited 75, the script requeued the job,
        # attempt 2 resumed from that checkpoint on both nodes and finished.
        assert outcome(preempted_job) == ("COMPLETED", "0:0", "1")
        first, second = attempts(preempted_log)
        stopped_at = int(re.search(r"preempted \(SIGUSR1\): checkpoint \S+ holds step (\d+)", first).group(1))
        assert PREEMPT_AFTER_STEP <= stopped_at < MAX_STEPS
        assert f"attempt 1 ended with status {PREEMPTED_EXIT_CODE}" in first
        assert "preempted after a complete checkpoint: requeueing" in first
        assert rank_hosts(first) == rank_hosts(second) == {0: "node1", 1: "node2"}
        assert f"resumed from {preempted_dir / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in second
        assert f"step_{stopped_at:08d}" in [path.name for path in checkpoint.complete_checkpoints(preempted_dir)]
        # No step skipped or repeated, the same data in the same order: the very same losses, to the last bit.
        trajectory = lambda rows: [(row["step"], row["loss"], row["lr"], row["grad_norm"]) for row in rows]
        assert trajectory(metrics(preempted_dir)) == trajectory(expected)
