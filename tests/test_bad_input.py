"""Bad input across every command: one line naming the file or key at fault (≤ 300 characters, no traceback), a
non-zero exit, and the output path exactly as it was (absent stays absent; an existing run or export untouched).

Each case builds its own bad input from one shared tiny world (a corpus, a tokenizer, shards, and a real training run
with a checkpoint and its final Hugging Face model) and runs the CLI in this process: every command checks its inputs
before it starts a process group, so none is started here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prep_fixtures import synthetic_docs, write_text_dir

from data_prep.pack import pack
from data_prep.tokenizer import train_sentencepiece
from longctx.cli import main
from longctx.config import PrepConfig, from_dict

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    "model.init={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 500, max_position_embeddings: 64}"
)
TRAIN = [
    "model.activation_checkpointing=false",
    "rope.type=none",
    "attention.implementation=sdpa",
    "train.seq_len=64",
    "train.global_batch_size=2",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "deepspeed.config=ds_configs/stage2.json",
]


@dataclass
class World:
    root: Path
    tokenizer: Path
    other_tokenizer: Path
    shards: Path  # a pack output: train/ and val/
    shards32: Path
    run: Path  # a training run: checkpoints/step_00000002 and final/

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoints" / "step_00000002"

    @property
    def model(self) -> Path:
        return self.run / "final"


def _pack(root: Path, tokenizer: Path, seq_len: int, out: Path) -> Path:
    config = {"inputs": [str(root / "text")], "tokenizer": str(tokenizer), "out": str(out), "seq_len": seq_len}
    pack(from_dict(PrepConfig, {**config, "num_workers": 1, "val_fraction": 0.2}), progress=False)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    docs = write_text_dir(root / "text", synthetic_docs(60))
    tokenizer = train_sentencepiece(docs, 500, root / "tok.model")
    other = train_sentencepiece(synthetic_docs(60, seed=1, max_words=100), 500, root / "other.model")
    shards = _pack(root, tokenizer, 64, root / "shards")
    shards32 = _pack(root, tokenizer, 32, root / "shards32")
    run = root / "run"
    command = [sys.executable, "-m", "longctx.cli", "train", TINY, *TRAIN, "train.save_every=2"]
    command += [f"data.train={shards / 'train'}", f"train.output_dir={run}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return World(root, Path(tokenizer), Path(other), shards, shards32, run)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def listing(path: Path) -> dict[str, tuple[int, int]] | None:
    """Every file and directory under path with its size and mtime (None: path is absent)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": (path.stat().st_size, path.stat().st_mtime_ns)}
    entries = {".": (0, 0)}
    for p in sorted(path.rglob("*")):
        stat = p.stat()
        entries[str(p.relative_to(path))] = (stat.st_size if p.is_file() else 0, stat.st_mtime_ns)
    return entries


# ----------------------------------------------------------------------------------------------------------------
# The cases: each returns (argv, the output path the command would write, fragments its message must contain)
# ----------------------------------------------------------------------------------------------------------------

Case = Callable[[World, Path], tuple[list[str], Path, list[str]]]


def train_argv(world: World, out: Path, *overrides: str, model: str | None = None) -> list[str]:
    model_arg = f"model.path={model}" if model else TINY
    return ["train", model_arg, *TRAIN, f"data.train={world.shards / 'train'}", f"train.output_dir={out}", *overrides]


def model_copy(world: World, tmp: Path) -> Path:
    return copy(world.model, tmp / "model")


def ckpt_copy(world: World, tmp: Path) -> Path:
    """A copy of the run whose newest checkpoint a case damages; returns that checkpoint."""
    run = copy(world.run, tmp / "run")
    return run / "checkpoints" / "step_00000002"


def case_unknown_key(world, tmp):
    return train_argv(world, tmp / "out", "train.precision=bf16"), tmp / "out", ["train.precision"]


def case_bad_value(world, tmp):
    return train_argv(world, tmp / "out", "train.lr=fast"), tmp / "out", ["train.lr"]


def case_group_size(world, tmp):
    argv = train_argv(world, tmp / "out", "attention.implementation=s2attn", "attention.group_size=48")
    return argv, tmp / "out", ["group_size"]


def case_missing_preset(world, tmp):
    argv = ["train", "--config", str(tmp / "nope.yaml"), f"train.output_dir={tmp / 'out'}"]
    return argv, tmp / "out", ["nope.yaml"]


def case_model_path_missing(world, tmp):
    return train_argv(world, tmp / "out", model=str(tmp / "absent")), tmp / "out", ["absent"]


def case_model_config_corrupt(world, tmp):
    model = model_copy(world, tmp)
    (model / "config.json").write_text("{ not json")
    return train_argv(world, tmp / "out", model=str(model)), tmp / "out", ["config.json"]


def case_model_weights_truncated(world, tmp):
    model = model_copy(world, tmp)
    truncate(model / "model.safetensors")
    return train_argv(world, tmp / "out", model=str(model)), tmp / "out", ["model.safetensors", "truncated"]


def case_model_weights_missing(world, tmp):
    model = model_copy(world, tmp)
    (model / "model.safetensors").unlink()
    return train_argv(world, tmp / "out", model=str(model)), tmp / "out", [str(model), "no weights"]


def case_model_index_names_missing_file(world, tmp):
    model = model_copy(world, tmp)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return train_argv(world, tmp / "out", model=str(model)), tmp / "out", ["model-00002-of-00002.safetensors"]


def case_unknown_model_type(world, tmp):
    argv = train_argv(world, tmp / "out")
    argv[1] = TINY.replace("model_type: llama", "model_type: lama")
    return argv, tmp / "out", ["model.init.model_type=lama", "llama"]


def case_data_missing(world, tmp):
    argv = train_argv(world, tmp / "out", f"data.train={tmp / 'no-shards'}")
    return argv, tmp / "out", ["no-shards"]


def case_data_other_seq_len(world, tmp):
    argv = train_argv(world, tmp / "out", f"data.train={world.shards32 / 'train'}")
    return argv, tmp / "out", ["train.seq_len"]


def case_data_other_tokenizer(world, tmp):
    model = model_copy(world, tmp)
    shutil.copy(world.other_tokenizer, model / "tokenizer.model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink(missing_ok=True)
    return train_argv(world, tmp / "out", model=str(model)), tmp / "out", ["tokenizer"]


def case_shard_corrupt(world, tmp):
    shards = copy(world.shards / "train", tmp / "shards")
    flip_byte(shards / "shard-00000.tokens")
    return train_argv(world, tmp / "out", f"data.train={shards}"), tmp / "out", ["shard-00000.tokens"]


def case_shard_truncated(world, tmp):
    shards = copy(world.shards / "train", tmp / "shards")
    truncate(shards / "shard-00000.tokens")
    return train_argv(world, tmp / "out", f"data.train={shards}"), tmp / "out", ["shard-00000.tokens"]


def case_manifest_missing(world, tmp):
    shards = copy(world.shards / "train", tmp / "shards")
    (shards / "manifest.json").unlink()
    return train_argv(world, tmp / "out", f"data.train={shards}"), tmp / "out", ["manifest.json"]


def case_ds_config_missing(world, tmp):
    argv = train_argv(world, tmp / "out", f"deepspeed.config={tmp / 'ds.json'}")
    return argv, tmp / "out", ["ds.json"]


def case_ds_config_not_json(world, tmp):
    (tmp / "ds.json").write_text("{ zero: 3 ")
    argv = train_argv(world, tmp / "out", f"deepspeed.config={tmp / 'ds.json'}")
    return argv, tmp / "out", ["ds.json"]


def case_ds_config_universal(world, tmp):
    ds = json.loads((ROOT / "ds_configs" / "stage2.json").read_text())
    (tmp / "ds.json").write_text(json.dumps({**ds, "checkpoint": {"load_universal": True}}))
    argv = train_argv(world, tmp / "out", f"deepspeed.config={tmp / 'ds.json'}")
    return argv, tmp / "out", ["ds.json", "load_universal"]


def case_resume_incomplete(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    (ckpt / "COMPLETE").unlink()
    argv = train_argv(world, tmp / "out", f"train.resume={ckpt}")
    return argv, tmp / "out", [str(ckpt), "COMPLETE"]


def case_resume_trained_truncated(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    truncate(ckpt / "trained.safetensors")
    argv = train_argv(world, tmp / "run", "train.max_steps=3")
    return argv, tmp / "run", ["trained.safetensors"]


def case_resume_trained_missing(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    (ckpt / "trained.safetensors").unlink()
    argv = train_argv(world, tmp / "run", "train.max_steps=3")
    return argv, tmp / "run", ["trained.safetensors"]


def case_resume_rank_state_missing(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    (ckpt / "trainer_state_rank0.pt").unlink()
    argv = train_argv(world, tmp / "run", "train.max_steps=3")
    return argv, tmp / "run", ["trainer_state_rank0.pt"]


def case_resume_optimizer_missing(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    for path in ckpt.glob("*optim_states.pt"):
        path.unlink()
    argv = train_argv(world, tmp / "run", "train.max_steps=3")
    return argv, tmp / "run", [str(ckpt), "optim_states"]


def case_resume_other_run(world, tmp):
    ckpt_copy(world, tmp)
    argv = train_argv(world, tmp / "run", "train.lr=5e-4")
    return argv, tmp / "run", ["train.lr"]


def case_resume_config_yaml_corrupt(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    (ckpt / "config.yaml").write_text("model: [unclosed\n")
    argv = train_argv(world, tmp / "run", "train.max_steps=3")
    return argv, tmp / "run", ["config.yaml"]


def ppl_argv(world: World, model: Path | str, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    data = data or world.shards / "val"
    return ["eval", "ppl", "--model", f"m={model}", "--data", str(data), "--lengths", "32", "--out", str(out), *extra]


def case_eval_model_missing(world, tmp):
    return ppl_argv(world, tmp / "absent", tmp / "out"), tmp / "out", ["absent"]


def case_eval_model_truncated(world, tmp):
    model = model_copy(world, tmp)
    truncate(model / "model.safetensors", keep=0.9)
    return ppl_argv(world, model, tmp / "out"), tmp / "out", ["model.safetensors"]


def case_eval_checkpoint_truncated(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    truncate(ckpt / "trained.safetensors", keep=0.9)
    return ppl_argv(world, ckpt, tmp / "out"), tmp / "out", ["trained.safetensors"]


def case_eval_data_missing(world, tmp):
    return ppl_argv(world, world.model, tmp / "out", data=tmp / "no-data"), tmp / "out", ["no-data"]


def case_eval_data_corrupt(world, tmp):
    data = copy(world.shards / "val", tmp / "val")
    flip_byte(data / "shard-00000.tokens", offset=10)
    return ppl_argv(world, world.model, tmp / "out", data=data), tmp / "out", ["shard-00000.tokens"]


def case_eval_lengths_not_numbers(world, tmp):
    argv = ppl_argv(world, world.model, tmp / "out")
    argv[argv.index("--lengths") + 1] = "32,long"
    return argv, tmp / "out", ["--lengths"]


def case_eval_lengths_past_data(world, tmp):
    argv = ppl_argv(world, world.model, tmp / "out")
    argv[argv.index("--lengths") + 1] = "64"
    argv += ["--max-tokens", "40"]
    return argv, tmp / "out", [str(world.shards / "val")]


def case_eval_out_is_file(world, tmp):
    (tmp / "out").write_text("results")
    return ppl_argv(world, world.model, tmp / "out"), tmp / "out", ["--out"]


def case_passkey_tokenizer_missing(world, tmp):
    argv = ["eval", "passkey", "--model", str(world.model), "--tokenizer", str(tmp / "tok.model")]
    return argv + ["--lengths", "48", "--out", str(tmp / "out")], tmp / "out", ["tok.model"]


def case_passkey_depth(world, tmp):
    argv = ["eval", "passkey", "--model", str(world.model), "--lengths", "48", "--depths", "0,1.5"]
    return argv + ["--out", str(tmp / "out")], tmp / "out", ["depths"]


def case_export_missing(world, tmp):
    return ["export", str(tmp / "no-run"), "--out", str(tmp / "out")], tmp / "out", ["no-run"]


def case_export_trained_truncated(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    truncate(ckpt / "trained.safetensors", keep=0.9)
    return ["export", str(ckpt), "--out", str(tmp / "out")], tmp / "out", ["trained.safetensors"]


def case_export_out_exists(world, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "kept.txt").write_text("a previous export")
    return ["export", str(world.checkpoint), "--out", str(tmp / "out")], tmp / "out", ["--overwrite"]


def case_export_config_corrupt(world, tmp):
    ckpt = ckpt_copy(world, tmp)
    (ckpt / "config.yaml").write_text("- just\n- a list\n")
    return ["export", str(ckpt), "--out", str(tmp / "out")], tmp / "out", ["config.yaml"]


def case_plan_missing_preset(world, tmp):
    return ["plan", "--config", str(tmp / "nope.yaml")], tmp / "nope.yaml", ["nope.yaml"]


def case_plan_unknown_key(world, tmp):
    return ["plan", "--config", "llama2-7b-32k", "memory.tiled=true"], tmp / "none", ["memory.tiled"]


def case_pack_input_missing(world, tmp):
    argv = ["prep", "pack", "--quiet", "--input", str(tmp / "corpus"), "--tokenizer", str(world.tokenizer)]
    return argv + ["--out", str(tmp / "out"), "--seq-len", "64"], tmp / "out", ["corpus"]


def case_pack_tokenizer_missing(world, tmp):
    argv = ["prep", "pack", "--quiet", "--input", str(world.root / "text"), "--tokenizer", str(tmp / "tk.model")]
    return argv + ["--out", str(tmp / "out"), "--seq-len", "64"], tmp / "out", ["tk.model"]


def case_pack_unknown_delimiter(world, tmp):
    argv = ["prep", "pack", "--quiet", "--input", str(world.root / "text"), "--tokenizer", str(world.tokenizer)]
    argv += ["--out", str(tmp / "out"), "--seq-len", "64", "--doc-start", "<|no_such_token|>"]
    return argv, tmp / "out", ["<|no_such_token|>"]


def case_inspect_corrupt(world, tmp):
    shards = copy(world.shards / "train", tmp / "shards")
    flip_byte(shards / "shard-00000.docs.npy", offset=200)
    return ["prep", "inspect", str(shards)], tmp / "shards", ["shard-00000.docs.npy"]


CASES: dict[str, Case] = {
    name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")
}


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, world, tmp_path, capsys):
    argv, out, fragments = CASES[name](world, tmp_path)
    before = listing(out)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, f"{name}: exit 0"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("longctx: error: "), err[-2000:]
    assert "Traceback" not in err
    message = lines[0].removeprefix("longctx: error: ")
    assert len(message) <= 300, f"{len(message)} characters: {message}"
    assert "--debug" not in message, f"an unexpected error, not a checked input: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert listing(out) == before, f"{name} changed {out}"
    print(f"{name}: {message}")  # pytest -s shows each message
