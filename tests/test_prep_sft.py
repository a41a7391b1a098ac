"""`prep sft`: each input format through the real model's chat template (SmolLM2-Instruct) and the built-in ones
(LongLoRA's llama-2, Alpaca) to the expected tokens and loss masks; packing isolates conversations (positions restart,
attention cannot cross); truncation keeps the answer; counts in the manifest; resume; readers; bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prep_fixtures import synthetic_docs

from data_prep.chat_templates import BUILTIN_TEMPLATES, LLAMA2_DEFAULT_SYSTEM
from data_prep.sft import prepare_sft
from data_prep.tokenizer import load_tokenizer, train_sentencepiece
from longctx.config import SFTConfig, from_dict
from longctx.data import IGNORE_INDEX, PackedDataset
from longctx.errors import UserError
from longctx.shards import ShardWriter, open_shards

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from real_model import real_model_dir  # noqa: E402

# LongLoRA's supervised-fine-tune.py PROMPT_DICT, as released (the target its LongAlpaca models were trained on).
LONGLORA_NO_INPUT = "[INST]{instruction}[/INST]"
LONGLORA_INPUT = (
    "[INST] <<SYS>>\n"
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information.\n"
    "<</SYS>> \n\n {instruction} \n{input} [/INST]"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

RECORDS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris"},
    {
        "conversations": [
            {"from": "human", "value": "Hi there"},
            {"from": "gpt", "value": "Hello! How can I help?"},
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "4"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ]
    },
]
SMOL_ANSWERS = [["Paris<|im_end|>"], ["Hello! How can I help?<|im_end|>", "4<|im_end|>"], ["Blue.<|im_end|>"]]
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smol() -> Path:
    return real_model_dir()


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory) -> Path:
    """A LLaMA-style HF tokenizer (<s>, </s>, sentencepiece BPE) without a chat template."""
    root = tmp_path_factory.mktemp("llama_tok")
    model = train_sentencepiece(synthetic_docs(60) + ["[INST] [/INST] <<SYS>> ### Instruction: Response:"], 500,
                                root / "tok.model")  # fmt: skip
    load_tokenizer(model).save_hf(root / "hf")
    return root / "hf"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prep(tmp_path: Path, records, tokenizer: Path, name: str = "out", **options) -> tuple[Path, dict]:
    data = write_jsonl(tmp_path / "data.jsonl", records)
    base = {"inputs": [str(data)], "tokenizer": str(tokenizer), "out": str(tmp_path / name), "seq_len": 256}
    summary = prepare_sft(from_dict(SFTConfig, {**base, "shuffle": False, **options}), progress=False)
    return tmp_path / name, summary


def conversations(shard_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) of every packed conversation, in order, cut at the recorded document starts."""
    shards, found = open_shards(shard_dir, verify="all"), []
    for i in range(len(shards)):
        tokens, mask, starts = shards[i], shards.loss_mask(i), shards.doc_starts(i).tolist()
        for start, end in zip(starts, starts[1:] + [None]):
            found.append((np.array(tokens[start:end]), mask[start:end]))
    return found


def spans(tokens: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def smol_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    if "conversations" in record:
        role = {"human": "user", "gpt": "assistant"}
        return [{"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]


# ------------------------------------------------------------------------------------------------------------------
# Rendering and masks
# ------------------------------------------------------------------------------------------------------------------


def test_each_format_gets_the_model_templates_tokens_and_only_answers_are_trained(smol, tmp_path):
    from transformers import AutoTokenizer

    out, summary = prep(tmp_path, RECORDS, smol, packing="pad")
    hf = AutoTokenizer.from_pretrained(smol)
    tokenizer = load_tokenizer(smol)
    found = conversations(out / "train")
    assert len(found) == 3 and summary["assistant_turns_trained"] == 4
    for record, answers, (tokens, mask) in zip(RECORDS, SMOL_ANSWERS, found):
        messages = smol_messages(record)
        expected = hf.apply_chat_template(messages, tokenize=True)["input_ids"]
        n = len(expected)
        assert tokens[:n].tolist() == expected and not mask[n:].any()  # then padding, never trained on
        assert [tokenizer.decode(tokens[a:b]) for a, b in spans(tokens, mask)] == answers
        # Each trained span starts where the generation prompt of its turn ends, in the HF tokenization.
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        prompt_lengths = [
            len(hf.apply_chat_template(messages[:i], add_generation_prompt=True)["input_ids"]) for i in turns
        ]
        assert [a for a, _ in spans(tokens, mask)] == prompt_lengths
    first = tokenizer.decode(found[0][0][: spans(*found[0])[0][0]])
    assert first == SMOL_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    # The trainer's labels: the token where the mask is set, -100 elsewhere.
    dataset = PackedDataset(out / "train")
    for i, (tokens, mask) in enumerate(found):
        labels = dataset[i]["labels"]
        assert (
            labels.tolist()
            == np.where(open_shards(out / "train").loss_mask(i), tokens.astype(np.int64), IGNORE_INDEX).tolist()
        )
        assert (labels != IGNORE_INDEX).sum().item() == mask.sum() > 0


def test_loss_on_last_trains_the_last_answer_only(smol, tmp_path):
    out, summary = prep(tmp_path, RECORDS[1:2], smol, loss_on="last")
    ((tokens, mask),) = conversations(out / "train")
    assert [load_tokenizer(smol).decode(tokens[a:b]) for a, b in spans(tokens, mask)] == ["4<|im_end|>"]
    assert summary["assistant_turns_trained"] == 1


def test_llama2_builtin_renders_as_longlora_and_alpaca_as_stanford(llama_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(llama_tokenizer)
    tokenizer = load_tokenizer(llama_tokenizer)
    records = [
        {"instruction": "the long context model", "output": "attention token"},
        {"instruction": "the rope", "input": "shard packing", "output": "lora"},
    ]
    llama2 = [
        "<s>" + LONGLORA_NO_INPUT.format(**records[0]) + "attention token</s>",
        "<s>" + LONGLORA_INPUT.format(**records[1]) + "lora</s>",
    ]
    out, _ = prep(tmp_path, records, llama_tokenizer, template="llama-2", packing="pad", seq_len=1024)
    found = conversations(out / "train")
    for text, answer, (tokens, mask) in zip(llama2, ["attention token</s>", "lora</s>"], found):
        ids = hf(text, add_special_tokens=False).input_ids
        assert tokens[: len(ids)].tolist() == ids and not mask[len(ids) :].any()
        ((a, b),) = spans(tokens, mask)
        assert b == len(ids) and tokens[b - 1] == tokenizer.eos_id and tokenizer.decode(tokens[a:b]) == answer
    out, _ = prep(tmp_path, records[:1], llama_tokenizer, name="alpaca", template="alpaca")
    ((tokens, mask),) = conversations(out / "train")
    ids = hf(ALPACA_NO_INPUT.format(**records[0]) + "attention token</s>", add_special_tokens=False).input_ids
    assert tokens[: len(ids)].tolist() == ids
    ((a, b),) = spans(tokens, mask)
    assert b == len(ids) and tokenizer.decode(tokens[a:b]) == "attention token</s>"


def test_builtin_templates_render_the_documented_strings():
    """The literal strings of LongLoRA's PROMPT_DICT and the built-ins agree (no tokenizer involved)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(name, messages):
        rendered, _ = render_jinja_template(
            [messages], chat_template=BUILTIN_TEMPLATES[name], bos_token="<s>", eos_token="</s>"
        )
        return rendered[0]

    user = {"role": "user", "content": "Q\n\nI", "instruction": "Q", "input": "I"}
    assert render("llama-2", [user, {"role": "assistant", "content": "A"}]) == (
        "<s>" + LONGLORA_INPUT.format(instruction="Q", input="I") + "A</s>"
    )
    assert LLAMA2_DEFAULT_SYSTEM in LONGLORA_INPUT
    system = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert render("llama-2", system) == "<s>[INST] <<SYS>>\nS\n<</SYS>> \n\n Q [/INST]A</s>"
    assert render("vicuna", system[1:]).startswith("<s>A chat between a curious user") and render(
        "vicuna", system[1:]
    ).endswith("\nUSER: Q\nASSISTANT: A</s>")


# ------------------------------------------------------------------------------------------------------------------
# Packing, truncation, counts
# ------------------------------------------------------------------------------------------------------------------


def test_packed_conversations_are_isolated_positions_restart_and_attention_cannot_cross(llama_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from longctx import attention

    records = [{"instruction": f"the long context {i} " * (3 + i), "output": f"token {i} model"} for i in range(6)]
    out, summary = prep(tmp_path, records, llama_tokenizer, template="llama-2", seq_len=128)
    shards = open_shards(out / "train")
    assert summary["splits"]["train"]["conversations"] == 6 and len(shards) < 6  # several per sequence
    with pytest.raises(UserError, match="set attention.isolate_documents=true"):
        PackedDataset(out / "train")
    dataset = PackedDataset(out / "train", isolate_documents=True)
    row = max(range(len(shards)), key=lambda i: len(shards.doc_starts(i)))
    starts = shards.doc_starts(row).tolist()
    assert len(starts) >= 2
    item = dataset[row]
    assert item["position_ids"][starts].tolist() == [0] * len(starts)
    assert item["position_ids"][starts[1] - 1].item() == starts[1] - starts[0] - 1
    # A tiny LLaMA under S²-Attn (training) and dense attention (eval): the last conversation of the row gets the same
    # logits packed as alone, so nothing before it was seen; the same tokens with unbroken positions do differ.
    attention.register()
    config = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="s2attn")
    attention.configure(model, group_size=32)
    last = slice(starts[-1], starts[-1] + 32)
    ids, positions = item["input_ids"][None], item["position_ids"][None]
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=positions).logits[0, last]
            alone = model(input_ids=ids[:, last], position_ids=positions[:, last]).logits[0]
            unbroken = model(input_ids=ids, position_ids=torch.arange(128)[None]).logits[0, last]
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
        assert (unbroken - alone).abs().max() > 1e-3


def test_truncation_keeps_the_answer_and_drops_are_counted(smol, tmp_path):
    tokenizer = load_tokenizer(smol)
    long_doc = " ".join(f"line {i} of a very long document" for i in range(80))
    records = [
        {"instruction": long_doc + "\nWhat is the last line?", "output": "line 79"},
        {"instruction": "short", "output": "ok"},
        {"instruction": "q", "output": "a long answer " * 100},
    ]
    out, summary = prep(tmp_path, records, smol, seq_len=200, packing="pad")
    (tokens, mask), (short, _) = conversations(out / "train")
    assert len(tokens) == 200 and mask[-1] == False  # noqa: E712 (the "\n" after <|im_end|> is the template's)
    answer = [tokenizer.decode(tokens[a:b]) for a, b in spans(tokens, mask)]
    assert answer == ["line 79<|im_end|>"]
    whole = tokenizer.encode(SMOL_SYSTEM + "<|im_start|>user\n" + records[0]["instruction"])
    text = tokenizer.decode(tokens)
    assert tokens[:50].tolist() == whole[:50]  # the head of the context...
    assert text.endswith(
        "\nWhat is the last line?<|im_end|>\n<|im_start|>assistant\nline 79<|im_end|>\n"
    )  # ...the tail
    n = len(tokenizer.encode(SMOL_SYSTEM + f"<|im_start|>user\n{records[0]['instruction']}<|im_end|>\n"
                                           "<|im_start|>assistant\nline 79<|im_end|>\n"))  # fmt: skip
    assert summary["truncated_conversations"] == 1 and summary["truncated_tokens"] == n - 200
    assert summary["dropped_answer_too_long"] == 1  # the 240-token answer cannot be kept whole in 200
    out, summary = prep(tmp_path, records, smol, name="drop", seq_len=200, overlong="drop")
    assert summary["dropped_overlong"] == 2 and summary["splits"]["train"]["conversations"] == 1
    assert summary["dropped_overlong_tokens"] > 400


def test_manifest_counts_match_the_shards_and_the_split_is_by_conversation(smol, tmp_path):
    import hashlib

    records = [RECORDS[i % 3] for i in range(40)]
    out, summary = prep(tmp_path, records, smol, seq_len=512, val_fraction=0.25, window_records=16)
    total = 0
    for split in ("train", "val"):
        shards = open_shards(out / split)
        sft = shards.manifest["sft"]
        masks = np.stack([shards.loss_mask(i) for i in range(len(shards))])
        starts = sum(len(shards.doc_starts(i)) for i in range(len(shards)))
        assert sft["supervised_tokens"] == masks.sum() == summary["splits"][split]["supervised_tokens"]
        assert sft["conversations"] == starts == shards.manifest["num_documents"]
        assert sft["supervised_tokens"] + sft["prompt_tokens"] + sft["padding_tokens"] == len(shards) * 512
        assert shards.manifest["format_version"] == 2
        total += starts
    assert total == 40 and 0 < summary["splits"]["val"]["conversations"] < 20
    text = open_shards(out / "train").manifest["sft"]["template"]["text"]
    assert summary["template"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert summary["template"]["sha256"] == hashlib.sha256((smol / "chat_template.jinja").read_bytes()).hexdigest()


def test_an_interrupted_run_resumes_to_identical_bytes_and_a_rerun_does_nothing(smol, tmp_path, monkeypatch):
    import data_prep.sft as sft

    records = [RECORDS[i % 3] for i in range(9)]
    prep(tmp_path, records, smol, name="whole", window_records=2, sequences_per_shard=1, shuffle=True)
    save = sft._save_state
    calls = []

    def save_then_die(out, next_window, *args):
        save(out, next_window, *args)
        calls.append(next_window)
        if next_window == 3:
            raise KeyboardInterrupt  # a kill after the third window

    monkeypatch.setattr(sft, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path, records, smol, name="resumed", window_records=2, sequences_per_shard=1, shuffle=True)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    _, summary = prep(tmp_path, records, smol, name="resumed", window_records=2, sequences_per_shard=1, shuffle=True)
    assert calls == [1, 2, 3, 4, 5] and summary["records"] == 9

    def files(d: Path) -> dict:  # the output directory's own path (recorded in the configs) made neutral
        return {p.relative_to(d): p.read_bytes().replace(str(d).encode(), b"OUT") for p in d.rglob("*") if p.is_file()}

    assert files(tmp_path / "whole") == files(tmp_path / "resumed")
    _, again = prep(tmp_path, records, smol, name="resumed", window_records=2, sequences_per_shard=1, shuffle=True)
    assert again["already_complete"] is True


def test_masked_shards_verify_and_resume_like_the_others(tmp_path):
    rng = np.random.default_rng(0)
    sequences = rng.integers(0, 500, size=(5, 12)).astype(np.uint16)
    masks = rng.random((5, 12)) < 0.4
    offsets, starts = np.arange(6), np.zeros(5, dtype=np.int64)
    writer = ShardWriter(tmp_path / "a", 12, np.uint16, 2, with_mask=True)
    writer.add(sequences[:3], offsets[:4], starts[:3], masks[:3])
    state = writer.state()
    writer.add(sequences[3:], offsets[3:] - 3, starts[3:], masks[3:])  # work a kill throws away
    writer.close()
    resumed = ShardWriter(tmp_path / "a", 12, np.uint16, 2, state, with_mask=True)
    resumed.add(sequences[3:], offsets[3:] - 3, starts[3:], masks[3:])
    resumed.finish({"last_num_valid": 12})
    shards = open_shards(tmp_path / "a", verify="all")
    assert np.array_equal(np.stack([shards.loss_mask(i) for i in range(5)]), masks)
    mask_file = tmp_path / "a" / "shard-00001.mask"
    mask_file.write_bytes(bytes([mask_file.read_bytes()[0] ^ 1]) + mask_file.read_bytes()[1:])
    with pytest.raises(UserError, match="checksum mismatch in .*shard-00001.mask"):
        open_shards(tmp_path / "a").loss_mask(2)
    mask_file.write_bytes(mask_file.read_bytes()[:-1])
    with pytest.raises(UserError, match="shard-00001.mask is missing or has the wrong size"):
        open_shards(tmp_path / "a")


# ------------------------------------------------------------------------------------------------------------------
# Readers and bad input
# ------------------------------------------------------------------------------------------------------------------


def test_json_parquet_and_saved_datasets_read_like_jsonl(smol, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [RECORDS[2], {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    reference, _ = prep(tmp_path, records, smol, name="jsonl")
    (tmp_path / "data.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "dataset"))
    expected = (reference / "train" / "shard-00000.tokens").read_bytes()
    for name in ("data.json", "data.parquet", "dataset"):
        config = {"inputs": [str(tmp_path / name)], "tokenizer": str(smol), "out": str(tmp_path / f"from-{name}")}
        prepare_sft(from_dict(SFTConfig, {**config, "seq_len": 256, "shuffle": False}), progress=False)
        assert (tmp_path / f"from-{name}" / "train" / "shard-00000.tokens").read_bytes() == expected, name


BAD_RECORDS = [
    ({"instruction": "q"}, "data.jsonl:2: the Alpaca record has no 'output' field: add the answer"),
    (
        {"messages": [{"role": "tool", "content": "x"}]},
        "data.jsonl:2: turn 1 of 'messages' has the unknown role 'tool'",
    ),
    ({"conversations": [{"from": "human", "value": "x"}]}, "data.jsonl:2: the conversation has no assistant turn"),
    ({"text": "plain"}, "data.jsonl:2: the record has no messages .OpenAI., conversations .ShareGPT. or instruction"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}, "holds list, not text"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS, ids=["no-output", "role", "no-assistant", "format", "content"])
def test_a_bad_record_is_one_line_naming_file_and_record_and_nothing_is_written(smol, tmp_path, bad, message):
    data = write_jsonl(tmp_path / "data.jsonl", [RECORDS[0], bad])
    config = from_dict(SFTConfig, {"inputs": [str(data)], "tokenizer": str(smol), "out": str(tmp_path / "out")})
    with pytest.raises(UserError, match=message) as error:
        prepare_sft(config, progress=False)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_bad_files_templates_and_a_missing_datasets_package(smol, llama_tokenizer, tmp_path, monkeypatch):
    def refused(inputs, tokenizer=smol, **options):
        config = {"inputs": [str(p) for p in inputs], "tokenizer": str(tokenizer), "out": str(tmp_path / "out")}
        with pytest.raises(UserError) as error:
            prepare_sft(from_dict(SFTConfig, {**config, **options}), progress=False)
        assert "\n" not in str(error.value) and not (tmp_path / "out").exists()
        return str(error.value)

    good = write_jsonl(tmp_path / "good.jsonl", RECORDS)
    (tmp_path / "broken.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    assert refused([tmp_path / "broken.jsonl"]).startswith(f"{tmp_path / 'broken.jsonl'}:2: not valid JSON")
    (tmp_path / "lines.json").write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[0]) + "\n")
    assert "holds one JSON value per line: rename it to .jsonl" in refused([tmp_path / "lines.json"])
    (tmp_path / "object.json").write_text(json.dumps(RECORDS[0]))
    assert "holds a JSON dict, not a list of records" in refused([tmp_path / "object.json"])
    (tmp_path / "notes.txt").write_text("hi")
    assert "is not instruction data that prep sft reads" in refused([tmp_path / "notes.txt"])
    assert "has no chat template: give --template with a built-in one (llama-2, alpaca, vicuna)" in refused(
        [good], tokenizer=llama_tokenizer
    )
    assert "--template 'chatml' is neither model, a built-in template" in refused([good], template="chatml")
    system_late = {"messages": [*RECORDS[2]["messages"][1:], {"role": "system", "content": "late"}]}
    late = write_jsonl(tmp_path / "late.jsonl", [system_late])
    assert f"{late}:1: the chat template (llama-2) refused the conversation" in refused(
        [late], tokenizer=llama_tokenizer, template="llama-2"
    )
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails as if it were not installed
    assert "needs the `datasets` package: pip install datasets" in refused([tmp_path / "dataset"])


def test_cli_prints_the_counts_reruns_as_a_no_op_and_inspect_shows_the_trained_spans(smol, tmp_path, capsys):
    from longctx.cli import main

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    out = tmp_path / "out"
    argv = ["prep", "sft", "--quiet", "--input", str(data), "--tokenizer", str(smol), "--out", str(out)]
    assert main([*argv, "--seq-len", "256", "--loss-on", "last"]) == 0
    table = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = {k.strip(): v.strip() for k, v in (line.strip().split("  ", 1) for line in table.splitlines()[1:])}
    assert rows["train: supervised (answer) tokens"] == str(summary["splits"]["train"]["supervised_tokens"])
    assert rows["assistant turns trained on"] == "3"  # the last of each conversation
    assert main(["prep", "sft", "--quiet", "--config", str(out / "prep_config.yaml")]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["prep", "inspect", str(out / "train"), "--chars", "100000"]) == 0
    assert "trained on " in capsys.readouterr().out
    assert main([*argv, "--seq-len", "1", "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("longctx: error: sft.seq_len=1 is too small") and error.count("\n") == 1
