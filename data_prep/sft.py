"""`longctx prep sft`: instruction data → conversations rendered with a chat template → tokens and a loss mask →
fixed-length sequences → the shards `prep pack` writes, plus a loss mask per shard.

    records (Alpaca / ShareGPT / OpenAI messages; .jsonl, .json, .parquet, a dataset saved with save_to_disk)
    → messages (system / user / assistant)
    → the text the chat template renders, and the character span of every trained assistant turn
    → tokens (the whole text tokenized once, as `apply_chat_template(..., tokenize=True)` does) and the loss mask
    → an over-long conversation: the middle of its context truncated (the last answer kept whole), or dropped
    → train / validation by a seeded draw per conversation
    → sequences: best-fit packing of whole conversations within a window, each its own document (`pack`; train with
      attention.isolate_documents=true), or one conversation per sequence (`pad`); padding is masked
    → shards: tokens, document starts and loss mask (longctx/shards.py)

Which tokens are trained on. For each trained assistant turn i, the template renders the conversation up to turn i
with the generation prompt (P) and up to and including turn i (Q); both must be prefixes of the whole rendering.
The turn's text is whole[len(P) : len(Q.rstrip())]: the answer and the end-of-turn marker the template writes
after it (`<|im_end|>`, `</s>`), not the whitespace before the next turn. A token is trained on iff its characters
(the tokenizer's offsets) overlap that text. A token that also holds prompt characters (a merge across the edge,
rare) is trained on and counted in `boundary_tokens`.

Every record is read and rendered before anything is written, so bad input (a missing field, an unknown role, no
assistant turn, a template that refuses a conversation, a file that is not JSON) stops the run with one line naming
the file and record, and nothing on disk. Then the run goes window by window (`window_records` records): each window
is packed and written whole and is a resume point, so a killed run resumes to byte-identical output.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.chat_templates import ChatTemplate, resolve_template
from data_prep.sources import JSONL_SUFFIXES, _is_hf_dataset, _open_jsonl
from data_prep.tokenizer import HFTokenizer, load_tokenizer
from longctx.atomic import write_json_atomic, write_text_atomic
from longctx.config import SFTConfig, to_dict
from longctx.errors import UserError
from longctx.shards import ShardWriter, token_dtype_for

PREP_FILE, STATE_FILE, SUMMARY_FILE, CONFIG_FILE = "prep.json", ".prep_state.json", "summary.json", "prep_config.yaml"
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}  # OpenAI messages
SHAREGPT_ROLES = {**ROLES, "human": "user", "gpt": "assistant", "chatgpt": "assistant"}
INPUT_KINDS = ".jsonl[.gz|.zst], .json (a list of records), .parquet, or a dataset directory saved with save_to_disk"


# ----------------------------------------------------------------------------------------------------------------
# Records → messages
# ----------------------------------------------------------------------------------------------------------------


def check_inputs(paths: list[str]) -> None:
    """Every input exists and is of a kind `prep sft` reads (before anything is written)."""
    if not paths:
        raise UserError("no inputs: give at least one --input PATH")
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"input {p} does not exist: check the path ({INPUT_KINDS})")
        is_file_kind = p.name.endswith(JSONL_SUFFIXES) or p.suffix in (".json", ".parquet")
        if not (is_file_kind or (p.is_dir() and _is_hf_dataset(p))):
            raise UserError(f"input {p} is not instruction data that prep sft reads: give {INPUT_KINDS}")


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of one input in file order; `where` names the file and the record's line or number."""
    path = Path(path)
    if path.is_dir():
        yield from _dataset_records(path)
    elif path.name.endswith(JSONL_SUFFIXES):
        yield from _jsonl_records(path)
    elif path.suffix == ".json":
        yield from _json_records(path)
    else:
        yield from _parquet_records(path)


def _jsonl_records(path: Path):
    with _open_jsonl(path) as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: line is not UTF-8: fix or remove it") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}): fix or remove that line") from None


def _json_records(path: Path):
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8: convert it") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise UserError(f"{path} holds one JSON value per line: rename it to .jsonl") from None
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix the file") from None
    if not isinstance(records, list):
        raise UserError(
            f"{path} holds a JSON {type(records).__name__}, not a list of records: give a list (as LongAlpaca's "
            "files are) or JSON Lines"
        )
    for number, record in enumerate(records, start=1):
        yield f"{path}: record {number}", record


def _parquet_records(path: Path):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for a file that is not parquet
        raise UserError(f"{path} is not a readable parquet file ({e}): check the file") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            number += 1
            yield f"{path}: row {number}", record


def _dataset_records(path: Path):
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{path} is a Hugging Face dataset directory, and reading it needs the `datasets` package: "
            "pip install datasets, or export the dataset to JSONL (dataset.to_json)"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = [(f"{path}[{name}]", loaded[name]) for name in sorted(loaded)]
    else:
        splits = [(str(path), loaded)]
    for name, split in splits:
        for number, record in enumerate(split, start=1):
            yield f"{name}: row {number}", record


def to_messages(record: Any, where: str) -> list[dict[str, str]]:
    """The conversation of one record: [{role, content}, ...] with roles system / user / assistant.

    Alpaca (instruction, input, output) becomes one user turn (instruction, then input after a blank line) and one
    assistant turn; the user turn keeps `instruction` and `input` for the built-in templates, which render them as
    their originals do. ShareGPT turns are {from, value} (or {role, content}); OpenAI messages {role, content}.
    """
    if not isinstance(record, dict):
        raise UserError(f"{where}: the record is a {type(record).__name__}, not an object: give one object per record")
    if "messages" in record:
        messages = _turns(record["messages"], "messages", ROLES, where)
    elif "conversations" in record:
        messages = _turns(record["conversations"], "conversations", SHAREGPT_ROLES, where)
    elif "instruction" in record:
        messages = _alpaca(record, where)
    else:
        raise UserError(
            f"{where}: the record has no messages (OpenAI), conversations (ShareGPT) or instruction + output (Alpaca) "
            f"field (it has {', '.join(sorted(map(str, record))[:8]) or 'none'}): convert it to one of these formats"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f"{where}: the conversation has no assistant turn, so there is nothing to train on: add the answer or "
            "remove the record"
        )
    return messages


def _alpaca(record: dict, where: str) -> list[dict[str, str]]:
    if "output" not in record:
        raise UserError(f"{where}: the Alpaca record has no 'output' field: add the answer as 'output'")
    fields = {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
    for name, value in fields.items():
        if not isinstance(value, str):
            raise UserError(f"{where}: field {name!r} is {type(value).__name__}, not text: give text")
    instruction, inp = fields["instruction"], fields["input"]
    user = {"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}
    return [{**user, "instruction": instruction, "input": inp}, {"role": "assistant", "content": fields["output"]}]


def _turns(turns: Any, key: str, roles: dict[str, str], where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: {key!r} must be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: turn {number} of {key!r} is a {type(turn).__name__}, not an object")
        role_key, content_key = ("from", "value") if key == "conversations" and "from" in turn else ("role", "content")
        if role_key not in turn or content_key not in turn:
            raise UserError(f"{where}: turn {number} of {key!r} lacks {role_key!r} or {content_key!r}: give both")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise UserError(
                f"{where}: turn {number} of {key!r} has the unknown role {turn[role_key]!r}: use one of "
                f"{', '.join(roles)}"
            )
        content = turn[content_key]
        if not isinstance(content, str):
            raise UserError(
                f"{where}: turn {number} of {key!r} holds {type(content).__name__}, not text: give text "
                "(images and tool calls are not supported)"
            )
        messages.append({"role": role, "content": content})
    return messages


# ----------------------------------------------------------------------------------------------------------------
# Messages → text, answer spans → tokens and loss mask
# ----------------------------------------------------------------------------------------------------------------


class Renderer:
    """Renders conversations with a chat template through the HF tokenizer's `apply_chat_template`."""

    def __init__(self, tokenizer_dir: Path, template_choice: str):
        from transformers import AutoTokenizer

        self._hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # trust_remote_code stays off
        self.template: ChatTemplate = resolve_template(template_choice, self._hf, tokenizer_dir)

    def render(self, messages: list[dict], where: str, *, generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._hf.apply_chat_template(
                messages, chat_template=self.template.text, tokenize=False, add_generation_prompt=generation_prompt
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
            raise UserError(
                f"{where}: the chat template ({self.template.name}) refused the conversation ({e}): fix the record or "
                "choose another --template"
            ) from None

    def render_with_spans(self, messages: list[dict], loss_on: str, where: str) -> tuple[str, list[tuple[int, int]]]:
        """(whole text, [(start, end) character span of each trained assistant turn])."""
        text = self.render(messages, where)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = []
        for number, i in enumerate(turns[-1:] if loss_on == "last" else turns, start=1):
            prompt = self.render(messages[:i], where, generation_prompt=True)
            turn = self.render(messages[: i + 1], where).rstrip()
            if not (text.startswith(prompt) and text.startswith(turn)):
                which = "the last assistant turn" if loss_on == "last" else f"assistant turn {number}"
                raise UserError(
                    f"{where}: the chat template ({self.template.name}) renders the conversation up to {which} "
                    "differently from the start of the whole conversation, so the answer cannot be located: "
                    + ("" if loss_on == "last" else "use --loss-on last, or ")
                    + "choose another --template"
                )
            spans.append((len(prompt), max(len(prompt), len(turn))))
        return text, spans


@dataclass
class Example:
    """One tokenized conversation."""

    ids: np.ndarray  # (n,) int64
    mask: np.ndarray  # (n,) bool: trained on
    answer_start: int  # first token of the last trained turn: truncation keeps it and everything after
    num_turns: int  # trained assistant turns
    boundary_tokens: int  # trained tokens that also hold prompt characters


def tokenize_examples(tokenizer: HFTokenizer, rendered: list[tuple[str, list[tuple[int, int]]]]) -> list[Example]:
    """Tokenize whole conversations (in parallel, in the tokenizers library) and mark their answer tokens."""
    encoded = tokenizer.encode_batch_with_offsets([text for text, _ in rendered])
    examples = []
    for (ids, offsets), (_, spans) in zip(encoded, rendered):
        starts, ends = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), dtype=bool)
        boundary = 0
        answer_start = len(ids)
        for start, end in spans:
            inside = (starts < end) & (ends > start)
            mask |= inside
            boundary += int((inside & ((starts < start) | (ends > end))).sum())
            hits = np.flatnonzero(inside)
            answer_start = int(hits[0]) if len(hits) else len(ids)
        examples.append(Example(ids, mask, answer_start, len(spans), boundary))
    return examples


def fit_to_length(example: Example, seq_len: int, overlong: str) -> tuple[Example | None, str]:
    """(the example as it goes into a sequence, or None; what happened: kept / truncated / dropped / answer_too_long).

    Truncation removes the middle of the context before the last trained turn: the first half of what fits stays
    (the template's opening, the start of the document), and the second half (the end of the document, the question)
    runs into the answer, which is kept whole.
    """
    n = len(example.ids)
    if n <= seq_len:
        return example, "kept"
    if overlong == "drop":
        return None, "dropped"
    budget = seq_len - (n - example.answer_start)  # context tokens that fit beside the answer and what follows it
    if budget < 1:
        return None, "answer_too_long"
    head = budget // 2
    keep = np.r_[0:head, example.answer_start - (budget - head) : n]
    ids, mask = example.ids[keep], example.mask[keep]
    return dataclasses.replace(example, ids=ids, mask=mask, answer_start=budget), "truncated"


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity: best-fit decreasing, deterministic."""
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for k in order:
        j = bisect.bisect_left(free, (lengths[k], -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(k)
        if room - lengths[k] > 0:
            bisect.insort(free, (room - lengths[k], b))
    return bins


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def _new_split_stats() -> dict[str, int]:
    return {"conversations": 0, "sequences": 0, "supervised_tokens": 0, "prompt_tokens": 0, "padding_tokens": 0}


def _new_stats() -> dict[str, Any]:
    return {
        "records": 0,
        "assistant_turns_trained": 0,
        "boundary_tokens": 0,
        "truncated_conversations": 0,
        "truncated_tokens": 0,
        "dropped_overlong": 0,
        "dropped_overlong_tokens": 0,
        "dropped_answer_too_long": 0,
        "splits": {},
    }


def _fingerprint(config: SFTConfig, tokenizer_identity: dict, template: ChatTemplate) -> str:
    options = {k: v for k, v in to_dict(config).items() if k != "out"}
    identity = {"options": options, "tokenizer": tokenizer_identity, "template": template.identity}
    blob = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _remove_outputs(out: Path) -> None:
    for name in ("train", "val"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (PREP_FILE, SUMMARY_FILE, CONFIG_FILE, STATE_FILE):
        (out / name).unlink(missing_ok=True)


def _out_dir_status(out: Path, fingerprint: str, overwrite: bool) -> str:
    """'fresh', 'resume' or 'complete'; refuses a directory holding other output unless overwrite."""
    prep_file = out / PREP_FILE
    if prep_file.is_file():
        same = json.loads(prep_file.read_text()).get("fingerprint") == fingerprint
        if not same and not overwrite:
            raise UserError(
                f"{out} holds shards prepared with different options, data kind, tokenizer or template: use another "
                "--out, or --overwrite to replace them"
            )
        if overwrite:
            _remove_outputs(out)
            return "fresh"
        return "complete" if (out / SUMMARY_FILE).is_file() and not (out / STATE_FILE).is_file() else "resume"
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty and is no `prep sft` output: choose an empty or new --out")
        _remove_outputs(out)
    return "fresh"


def _all_records(inputs: list[str]) -> Iterator[tuple[str, Any]]:
    return itertools.chain.from_iterable(iter_records(p) for p in inputs)


def prepare_sft(config: SFTConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) `prep sft`; returns the summary (`already_complete` True when there was nothing to do)."""
    from tqdm import tqdm

    check_inputs(config.inputs)
    if not config.out:
        raise UserError("no output directory: give --out DIR")
    config = dataclasses.replace(config, tokenizer=str(Path(config.tokenizer).resolve()))
    tokenizer = load_tokenizer(config.tokenizer)
    if not isinstance(tokenizer, HFTokenizer):
        raise UserError(
            f"prep sft renders chat templates with the model's Hugging Face tokenizer: give its directory "
            f"(tokenizer.json), not {config.tokenizer}"
        )
    renderer = Renderer(Path(config.tokenizer), config.template)
    dtype = token_dtype_for(tokenizer.vocab_size, config.token_dtype)
    num_records = 0
    checking = tqdm(desc="checking", unit=" records", disable=not progress, dynamic_ncols=True, leave=False)
    for where, record in _all_records(config.inputs):  # every record read and rendered before anything is written
        renderer.render_with_spans(to_messages(record, where), config.loss_on, where)
        num_records += 1
        checking.update()
    checking.close()
    if not num_records:
        raise UserError(f"the inputs {config.inputs} hold no records: check the files")

    out = Path(config.out)
    fingerprint = _fingerprint(config, tokenizer.identity, renderer.template)
    status = _out_dir_status(out, fingerprint, overwrite)
    if status == "complete":
        return {**json.loads((out / SUMMARY_FILE).read_text()), "already_complete": True}
    out.mkdir(parents=True, exist_ok=True)
    if status == "fresh":
        write_text_atomic(out / CONFIG_FILE, _yaml(to_dict(config)))
        record = {
            "kind": "sft",
            "fingerprint": fingerprint,
            "tokenizer": tokenizer.identity,
            "template": renderer.template.identity,
            "config": to_dict(config),
        }
        write_json_atomic(out / PREP_FILE, record)
    state = json.loads((out / STATE_FILE).read_text()) if (out / STATE_FILE).is_file() else None
    try:
        summary = _run(config, tokenizer, renderer, dtype, out, state, num_records, progress)
    except UserError:
        _remove_outputs(out)  # leave no half-written output behind
        raise
    return {**summary, "already_complete": False}


def _yaml(tree: dict) -> str:
    import yaml

    return yaml.safe_dump(tree, sort_keys=False)


def _run(config, tokenizer, renderer, dtype, out: Path, state, num_records: int, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    split_names = ["train", "val"] if config.val_fraction > 0 else ["train"]
    stats = state["stats"] if state else _new_stats()
    writers = {}
    for name in split_names:
        writer_state = state["writers"][name] if state else None
        writers[name] = ShardWriter(
            out / name, config.seq_len, dtype, config.sequences_per_shard, writer_state, with_mask=True
        )
        stats["splits"].setdefault(name, _new_split_stats())
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    window_index = state["next_window"] if state else 0
    records = itertools.islice(_all_records(config.inputs), stats["records"], None)  # resume: skip what is done
    bar = tqdm(total=num_records, initial=stats["records"], unit=" records", disable=not progress, dynamic_ncols=True)
    while window := list(itertools.islice(records, config.window_records)):
        rendered = [renderer.render_with_spans(to_messages(r, where), config.loss_on, where) for where, r in window]
        examples = tokenize_examples(tokenizer, rendered)
        rng = np.random.default_rng([config.seed, window_index])
        split_draw = rng.random(len(examples))
        by_split: dict[str, list[Example]] = {name: [] for name in split_names}
        for example, draw in zip(examples, split_draw):
            fitted, outcome = fit_to_length(example, config.seq_len, config.overlong)
            _count_outcome(stats, example, outcome, config.seq_len)
            if fitted is not None:
                stats["assistant_turns_trained"] += fitted.num_turns
                stats["boundary_tokens"] += fitted.boundary_tokens
                by_split["val" if draw < config.val_fraction else "train"].append(fitted)
        for name, split_examples in by_split.items():
            _write_sequences(writers[name], split_examples, config, pad_id, rng, stats["splits"][name])
        stats["records"] += len(window)
        window_index += 1
        _save_state(out, window_index, stats, writers)
        bar.update(len(window))
    bar.close()
    manifests = {}
    for name, writer in writers.items():
        split = stats["splits"][name]
        if name == "train" and not split["sequences"]:
            raise UserError(
                f"no conversation fits in {config.seq_len} tokens (all {stats['records']} were dropped): raise "
                "--seq-len or use --overlong truncate"
            )
        manifests[name] = writer.finish(_manifest_fields(config, tokenizer, renderer.template, name, split, pad_id))
        split["shards"] = len(manifests[name]["shards"])
    summary = {**stats, "seq_len": config.seq_len, "template": renderer.template.identity}
    write_json_atomic(out / SUMMARY_FILE, summary)
    (out / STATE_FILE).unlink()
    return summary


def _count_outcome(stats: dict, example: Example, outcome: str, seq_len: int) -> None:
    n = len(example.ids)
    if outcome == "truncated":
        stats["truncated_conversations"] += 1
        stats["truncated_tokens"] += n - seq_len
    elif outcome == "dropped":
        stats["dropped_overlong"] += 1
        stats["dropped_overlong_tokens"] += n
    elif outcome == "answer_too_long":
        stats["dropped_answer_too_long"] += 1


def _write_sequences(writer: ShardWriter, examples: list[Example], config, pad_id: int, rng, split: dict) -> None:
    """Pack (or pad) one window's conversations of a split into sequences and append them to its shards."""
    if not examples:
        return
    if config.packing == "pack":
        bins = best_fit([len(e.ids) for e in examples], config.seq_len)
    else:
        bins = [[k] for k in range(len(examples))]
    if config.shuffle:
        bins = [bins[k] for k in rng.permutation(len(bins))]
    tokens = np.full((len(bins), config.seq_len), pad_id, dtype=writer.dtype)
    masks = np.zeros((len(bins), config.seq_len), dtype=bool)
    doc_starts: list[int] = []
    offsets = [0]
    for row, members in enumerate(bins):
        position = 0
        for k in members:
            example = examples[k]
            n = len(example.ids)
            tokens[row, position : position + n] = example.ids
            masks[row, position : position + n] = example.mask
            doc_starts.append(position)
            position += n
        offsets.append(len(doc_starts))
        split["padding_tokens"] += config.seq_len - position
    writer.add(tokens, np.asarray(offsets), np.asarray(doc_starts, dtype=np.int64), masks)
    num_supervised = int(masks.sum())
    split["conversations"] += len(examples)
    split["sequences"] += len(bins)
    split["supervised_tokens"] += num_supervised
    split["prompt_tokens"] += sum(len(e.ids) for e in examples) - num_supervised


def _manifest_fields(config, tokenizer, template: ChatTemplate, name: str, split: dict, pad_id: int) -> dict:
    return {
        "split": name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": {**tokenizer.identity, "path": config.tokenizer},
        "special_ids": {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id},
        "pad_value": pad_id,
        "last_num_valid": config.seq_len if split["sequences"] else 0,  # padding is masked, not cut
        "num_documents": split["conversations"],
        "sft": {
            "template": {**template.identity, "text": template.text},
            "packing": config.packing,
            "loss_on": config.loss_on,
            "overlong": config.overlong,
            **{k: v for k, v in split.items() if k != "shards"},
        },
        "sft_config": to_dict(config),
    }


def _save_state(out: Path, next_window: int, stats: dict, writers: dict[str, ShardWriter]) -> None:
    state = {"next_window": next_window, "stats": stats, "writers": {n: w.state() for n, w in writers.items()}}
    write_json_atomic(out / STATE_FILE, state, indent=None)


def format_summary(summary: dict[str, Any]) -> str:
    """The final table `prep sft` prints."""
    s = summary
    rows = [
        ("records read", s["records"]),
        ("template", f"{s['template']['name']} (sha256 {s['template']['sha256'][:12]})"),
        ("assistant turns trained on", s["assistant_turns_trained"]),
        ("truncated (context middle)", f"{s['truncated_conversations']} conv / {s['truncated_tokens']} tokens removed"),
        ("dropped: over seq_len", f"{s['dropped_overlong']} conv / {s['dropped_overlong_tokens']} tokens"),
        ("dropped: answer alone over seq_len", s["dropped_answer_too_long"]),
        ("tokens straddling a prompt/answer edge", s["boundary_tokens"]),
    ]
    for name, split in s["splits"].items():
        rows += [
            (f"{name}: conversations", split["conversations"]),
            (f"{name}: sequences x {s['seq_len']}", split["sequences"]),
            (f"{name}: supervised (answer) tokens", split["supervised_tokens"]),
            (f"{name}: masked prompt tokens", split["prompt_tokens"]),
            (f"{name}: padding tokens (masked)", split["padding_tokens"]),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
