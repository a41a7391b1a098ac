"""RULER-style tasks: every generator against a "model" that reads the answer out of the prompt text (100%) and a
constant one (0%); prompts byte-identical for a seed and independent of what else is asked; lengths and depths as
asked; the chat template; the one-line errors. No model runs here (tests/test_eval_suite_cli.py runs them)."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from longctx import ruler
from longctx.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from real_model import real_model_dir  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run far faster on one thread than on two when the cores are shared (measured 25x on 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ByteTokenizer:
    """Bytes shifted by 3 (0 pad, 1 BOS, 2 EOS): exact, one token per character."""

    bos_id, eos_id, vocab_size = 1, 2, 259
    path = Path("bytes")

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


@pytest.fixture(scope="module")
def corpus():
    return ruler.load_corpus(None, ByteTokenizer())


@pytest.fixture(scope="module")
def plain():
    return ruler.PromptFormat(ByteTokenizer(), None)


def oracle(text: str) -> str:
    """The answer read from the prompt alone, as a perfect model would: no access to the sample's references."""
    if "special magic" in text:
        question = re.findall(r"special magic \w+ for (.+?) mentioned in the provided text\?", text)[-1]
        keys = re.split(r", and |, ", question)
        values = [v for key in keys for v in re.findall(rf"special magic \w+ for {re.escape(key)} is: (\S+)\.\n", text)]
        return " ".join(values)
    if "variable assignment" in text:
        value = re.findall(r"assigned the value (\d+) in the text above", text)[-1]
        assignments = re.findall(r"^VAR (\w+) = (?:VAR )?(\w+)$", text, flags=re.M)
        found = {value}
        while True:
            more = {name for name, source in assignments if source in found} - found
            if not more:
                return " ".join(sorted(found - {value}))
            found |= more
    if "numbered list of words" in text:
        last_list = text.split("Memorize the ones that appear most often.\n")[-1].split("\nQuestion:")[0]
        counts = Counter(re.findall(r"\d+\. (\w+)", last_list))
        return " ".join(word for word, _ in counts.most_common(10))
    coded = text.split("most frequently appeared coded words. ")[-1].split("\nQuestion:")[0].split()
    return " ".join(word for word, _ in Counter(w for w in coded if w != "....").most_common(3))


ALL_TASKS = list(ruler.TASKS.values())


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_a_model_that_reads_the_prompt_scores_100_and_a_constant_one_0(task, plain, corpus):
    lengths = [2500, 9000] if task.kind == "cwe" else [2000, 4000]  # bytes: ~4x the tokens of a BPE
    samples = ruler.generate_samples([task], lengths, [0.0, 0.4, 1.0], 3, plain, seed=5, corpus=corpus)
    assert len(samples) == len(lengths) * (3 if task.uses_depth else 1) * 3
    for sample in samples:
        assert ruler.string_match_all(oracle(sample.text), sample.outputs) == 1.0, (sample.task, sample.outputs)
        assert ruler.string_match_part(oracle(sample.text), sample.outputs) == 1.0
        for constant in ("0", "The special magic number is 42.", "Answer: VAR"):
            assert ruler.string_match_all(constant, sample.outputs) == 0.0
            assert ruler.string_match_part(constant, sample.outputs) == 0.0
    scores = [ruler.string_match_all(" ".join(s.outputs[:1]), s.outputs) for s in samples]
    assert scores == [1 / len(s.outputs) for s in samples]  # one of k references found: 1/k, as RULER's match_all


def test_scoring_is_rulers():
    assert ruler.string_match_all("  The numbers are 12, 34\x07 and 56. ", ["12", "34", "99", "56"]) == 0.75
    assert ruler.string_match_part("The numbers are 12", ["99", "12"]) == 1.0
    assert ruler.string_match_all("ALPHA-Beta", ["alpha-beta"]) == 1.0  # case-insensitive
    assert ruler.postprocess(" a\x00b\tc \n") == "a\nb\nc"


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_a_seed_gives_byte_identical_prompts_whatever_else_is_asked(task, plain, corpus):
    length = 9000 if task.kind == "cwe" else 2000
    first = ruler.generate_samples([task], [length], [0.5], 2, plain, seed=11, corpus=corpus)
    other = ruler.TASKS["fwe" if task.name != "fwe" else "vt"]
    again = ruler.generate_samples([other, task], [length, length + 700], [1.0, 0.5], 2, plain, seed=11, corpus=corpus)
    again = [s for s in again if s.task == task.name and s.length == length and s.depth in (0.5, None)]
    assert [s.text for s in first] == [s.text for s in again]
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    other_seed = ruler.generate_samples([task], [length], [0.5], 2, plain, seed=12, corpus=corpus)
    assert [s.text for s in first] != [s.text for s in other_seed]
    assert first[0].text != first[1].text  # samples of a cell differ


def test_prompts_fill_the_length_within_one_haystack_line(plain, corpus):
    tasks = [ruler.TASKS[name] for name in ("niah_single_1", "niah_single_2", "niah_multikey_2", "vt", "fwe")]
    for sample in ruler.generate_samples(tasks, [2000, 3000], [0.0, 1.0], 1, plain, seed=0, corpus=corpus):
        assert len(sample.token_ids) <= sample.length
        assert sample.token_ids[0] == ByteTokenizer.bos_id  # no chat template: the document-start token first
        draw = ruler.task_draw(ruler.TASKS[sample.task], __import__("random").Random(
            f"0/{sample.task}/{sample.length}/{sample.depth}/0"), sample.length, sample.depth, corpus,
            __import__("random").Random(f"0/{sample.task}/haystack").randrange(len(corpus.lines)))  # fmt: skip
        longer = plain.encode(plain.text(*draw.render(sample.haystack_lines + 1)))
        assert len(longer) > sample.length  # one more line would not fit


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_needle_sits_at_the_asked_depth(depth, plain, corpus):
    for name in ("niah_single_1", "niah_single_2"):
        (sample,) = ruler.generate_samples([ruler.TASKS[name]], [3000], [depth], 1, plain, seed=1, corpus=corpus)
        context = sample.text.split("afterwards.\n", 1)[1].rsplit("\nWhat is the special", 1)[0].split("\n")
        needle_line = next(i for i, line in enumerate(context) if sample.outputs[0] in line)
        assert needle_line == round(depth * (len(context) - 1))


def test_chat_template_of_the_real_model_wraps_the_question_and_the_answer_continues():
    model_dir = real_model_dir()
    from data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    fmt = ruler.PromptFormat(tokenizer, ruler.load_chat_template(model_dir))
    (sample,) = ruler.generate_samples([ruler.TASKS["niah_single_1"]], [1024], [0.5], 1, fmt, seed=0)
    assert sample.text.startswith("<|im_start|>system\n") and "<|im_start|>user\nA special magic number" in sample.text
    assert sample.text.endswith(
        "mentioned in the provided text?<|im_end|>\n<|im_start|>assistant\nThe special magic number for "
        f"{re.findall(r'number for (.+?) mentioned', sample.text)[-1]} mentioned in the provided text is"
    )
    assert sample.token_ids == tokenizer.encode(sample.text)  # one text encoded once, the markers as special tokens
    assert sample.token_ids[0] == tokenizer.token_to_id("<|im_start|>") and 1024 - 40 < len(sample.token_ids) <= 1024
    assert ruler.load_chat_template(ROOT / "nowhere") is None


def test_too_short_lengths_and_lossy_tokenizers_are_refused(plain, corpus):
    with pytest.raises(UserError, match=r"length 100 is too short for task vt: its prompt needs \d+ tokens"):
        ruler.generate_samples([ruler.TASKS["vt"]], [100], [0.5], 1, plain, corpus=corpus)

    class NoDigits(ByteTokenizer):  # a vocabulary without byte fallback: digits become <unk> (dropped on decoding)
        def encode(self, text):
            return [0 if chr(b).isdigit() else b + 3 for b in text.encode()]

    with pytest.raises(UserError, match="cannot encode the tasks' filler and needles.*'1234567.'"):
        ruler.check_encodes(NoDigits())
    ruler.check_encodes(ByteTokenizer())


def test_task_names_and_prefixes_parse():
    assert ruler.parse_tasks("vt,niah_single*") == ["vt", "niah_single_1", "niah_single_2", "niah_single_3"]
    with pytest.raises(UserError, match="unknown task 'qa': choose among niah_single_1"):
        ruler.parse_tasks("qa")


def test_greedy_decoder_reusing_the_shared_prefix_answers_as_a_fresh_forward(plain, corpus):
    import torch
    from test_evaluate import tiny_llama

    from longctx.evaluate import greedy_generator

    model = tiny_llama(max_position_embeddings=1024)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # sharper logits: fewer near-ties between the two paths
    samples = ruler.generate_samples([ruler.TASKS["niah_single_2"]], [500], [1.0, 0.5, 0.0], 2, plain, corpus=corpus)
    decoder = ruler.GreedyDecoder(model, {2})
    fresh = greedy_generator(model)
    for sample in samples:
        assert decoder(sample.token_ids, 12) == fresh(sample.token_ids, 12)
    assert decoder.num_reused > 1000  # deepest first: each prompt shares the haystack before its needle
