"""A checkpoint or model directory someone hands you cannot run code: a pickle payload (an object whose
`__reduce__` creates a marker file) planted in every file that resume, eval or export reads never runs, and custom
code is never turned on by a file inside a checkpoint or model directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from prep_fixtures import synthetic_docs, write_text_dir

from data_prep.pack import pack
from data_prep.tokenizer import train_sentencepiece
from longctx import checkpoint
from longctx.cli import main
from longctx.config import PrepConfig, from_dict
from longctx.errors import UserError
from longctx.merge import read_checkpoint
from longctx.safe_load import load_torch_file

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    "model.init={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 500, max_position_embeddings: 64}"
)
TRAIN = [
    TINY,
    "model.activation_checkpointing=false",
    "rope.type=none",
    "attention.implementation=sdpa",
    "train.seq_len=64",
    "train.global_batch_size=2",
    "train.warmup_steps=1",
    "train.save_every=2",
    "deepspeed.config=ds_configs/stage2.json",
]


class Payload:
    """Unpickling this creates `marker`: what an attacker's checkpoint would do with os.system instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """Rewrite a torch file with the payload inside (what it held stays, so only the payload can make it fail)."""
    obj = torch.load(path, weights_only=False)
    obj = {**obj, "planted": Payload(marker)} if isinstance(obj, dict) else {"planted": Payload(marker), "was": obj}
    torch.save(obj, path)


def train(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "longctx.cli", "train", *TRAIN, *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    docs = write_text_dir(root / "text", synthetic_docs(40))
    tokenizer = train_sentencepiece(docs, 500, root / "tok.model")
    config = {"inputs": [str(root / "text")], "tokenizer": str(tokenizer), "out": str(root / "shards"), "seq_len": 64}
    pack(from_dict(PrepConfig, {**config, "num_workers": 1, "val_fraction": 0.2}), progress=False)
    done = train("train.max_steps=2", f"data.train={root / 'shards' / 'train'}", f"train.output_dir={root / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def run_copy(world: Path, tmp: Path) -> tuple[Path, Path]:
    run = shutil.copytree(world / "run", tmp / "run")
    return run, run / "checkpoints" / "step_00000002"


def test_the_payload_is_real(world, tmp_path):
    """The planted files do run code when unpickled as DeepSpeed does (weights_only=False): the tests below can fail."""
    _, ckpt = run_copy(world, tmp_path)
    marker = tmp_path / "MARKER"
    target = next(ckpt.glob("*optim_states.pt"))
    plant(target, marker)
    torch.load(target, weights_only=False)
    assert marker.exists()


def test_every_checkpoint_file_is_read_without_running_code(world, tmp_path):
    _, ckpt = run_copy(world, tmp_path)
    marker = tmp_path / "MARKER"
    files = sorted(ckpt.glob("*.pt"))
    for kind in ("model_states", "optim_states", "trainer_state"):
        assert any(kind in f.name for f in files), (kind, files)
    for file in files:
        load_torch_file(file)  # each loads as it is: DeepSpeed's types are allowed
        plant(file, marker)
        with pytest.raises(UserError, match=rf"{file.name} asks to load the Python global .*train.trust_checkpoint"):
            load_torch_file(file)
        assert not marker.exists(), file
    # The explicit opt-in loads it (and runs it): what train.trust_checkpoint_pickles=true does.
    load_torch_file(files[0], trust_pickles=True)
    assert marker.exists()


@pytest.mark.parametrize("planted", ["all", "optim_states", "trainer_state"])
def test_resume_refuses_a_planted_checkpoint(world, tmp_path, planted):
    run, ckpt = run_copy(world, tmp_path)
    marker = tmp_path / "MARKER"
    for file in ckpt.glob("*.pt"):
        if planted == "all" or planted in file.name:
            plant(file, marker)
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    done = train("train.max_steps=3", f"data.train={world / 'shards' / 'train'}", f"train.output_dir={run}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "asks to load the Python global" in done.stderr and "train.trust_checkpoint_pickles=true" in done.stderr
    assert not marker.exists()
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before  # run untouched


def test_eval_and_export_never_unpickle(world, tmp_path, capsys):
    """They read trained.safetensors, JSON and YAML only: with every pickle planted they work, and nothing runs."""
    _, ckpt = run_copy(world, tmp_path)
    marker = tmp_path / "MARKER"
    for file in ckpt.glob("*.pt"):
        plant(file, marker)
    val = world / "shards" / "val"
    assert (
        main(
            [
                "eval",
                "ppl",
                "--model",
                f"c={ckpt}",
                "--data",
                str(val),
                "--lengths",
                "32",
                "--out",
                str(tmp_path / "ppl"),
            ]
        )
        == 0
    )
    assert main(["export", str(ckpt), "--out", str(tmp_path / "export"), "--format", "merged"]) == 0
    assert not marker.exists()
    assert (tmp_path / "ppl" / "perplexity.json").is_file() and (tmp_path / "export" / "model.safetensors").is_file()


def test_a_yaml_payload_in_config_yaml_is_refused(world, tmp_path, capsys):
    _, ckpt = run_copy(world, tmp_path)
    marker = tmp_path / "MARKER"
    tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    text = (
        yaml.safe_dump(tree)
        + f"evil: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    )
    (ckpt / "config.yaml").write_text(text)
    for argv in (
        ["export", str(ckpt), "--out", str(tmp_path / "export")],
        [
            "eval",
            "ppl",
            "--model",
            str(ckpt),
            "--data",
            str(world / "shards" / "val"),
            "--lengths",
            "32",
            "--out",
            str(tmp_path / "ppl"),
        ],
    ):
        assert main(argv) == 2
        assert "config.yaml" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "export").exists() and not (tmp_path / "ppl").exists()


def test_trust_remote_code_is_never_taken_from_a_checkpoint(world, tmp_path):
    _, ckpt = run_copy(world, tmp_path)
    tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    tree["model"]["trust_remote_code"] = True
    (ckpt / "config.yaml").write_text(yaml.safe_dump(tree))
    assert checkpoint.load_run_config(ckpt).model.trust_remote_code is False
    assert read_checkpoint(ckpt).cfg.model.trust_remote_code is False
    # Only the caller turns it on (export --trust-remote-code, the running run's own config).
    assert read_checkpoint(ckpt, trust_remote_code=True).cfg.model.trust_remote_code is True


def _custom_code_model(world: Path, tmp: Path, marker: Path) -> Path:
    """The run's final model, its config.json pointing at custom code that would create the marker on import."""
    model = shutil.copytree(world / "run" / "final", tmp / "model")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    return model


def test_a_model_directory_cannot_run_code(world, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    model = _custom_code_model(world, tmp_path, marker)
    val = world / "shards" / "val"
    main(["eval", "ppl", "--model", str(model), "--data", str(val), "--lengths", "32", "--out", str(tmp_path / "a")])
    assert not marker.exists()
    # Weights as a pickle, under either name: refused by the safetensors check, or read weights-only by transformers.
    for name in ("model.safetensors", "pytorch_model.bin"):
        bad = shutil.copytree(world / "run" / "final", tmp_path / f"bad-{name}")
        (bad / "model.safetensors").unlink()
        torch.save({"planted": Payload(marker)}, bad / name)
        argv = ["eval", "ppl", "--model", str(bad), "--data", str(val), "--lengths", "32", "--out", str(tmp_path / "b")]
        assert main(argv) == 2
        assert str(bad) in capsys.readouterr().err
        assert not marker.exists(), name
        assert not (tmp_path / "b").exists()
