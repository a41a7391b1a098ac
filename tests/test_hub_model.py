"""model.path may be a Hugging Face Hub id: it resolves through the HF cache, and HF_HUB_OFFLINE=1 is respected
(tested offline, with a cache directory prepared here as the Hub client lays it out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from longctx import checkpoint
from longctx.config import RunConfig, load_config
from longctx.model import build_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist" / "train_tiny.py"
sys.path.insert(0, str(SCRIPT.parent))
from train_tiny import TINY_LLAMA  # noqa: E402

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_cache(root: Path) -> dict[str, str]:
    """A HF cache holding REPO_ID at COMMIT, and the environment that reads only it."""
    repo = root / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    model = build_model(load_config(RunConfig, None, [TINY_LLAMA, "rope.type=none"]), for_training=False)
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}


def train(output_dir: Path, model_path: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    overrides = ["model.init={}", f"model.path={model_path}", "train.max_steps=1", "rope.type=none"]
    command = [sys.executable, str(SCRIPT), str(output_dir), *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_a_hub_id_trains_from_the_cache_offline(tmp_path):
    env = offline_cache(tmp_path)
    result = train(tmp_path / "run", REPO_ID, env)
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot = tmp_path / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    # The run names the directory it read: resume, export and eval find the same weights.
    assert f"path: {snapshot}" in (tmp_path / "run" / "config.yaml").read_text()
    ckpt = checkpoint.complete_checkpoints(tmp_path / "run")[-1]
    assert json.loads((ckpt / "base.json").read_text())["path"] == str(snapshot.resolve())


def test_an_id_missing_from_the_cache_offline_is_one_line(tmp_path):
    env = offline_cache(tmp_path)
    result = train(tmp_path / "run", "tiny-org/not-downloaded", env)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert "model.path=tiny-org/not-downloaded is neither a local directory nor in the Hugging Face cache" in error
    assert "huggingface-cli download tiny-org/not-downloaded" in error
    assert not (tmp_path / "run").exists()
