"""RULER-style synthetic long-context tasks (Hsieh et al., 2024): generated offline, deterministic from a seed, for any
tokenizer and any context length; greedy answers scored as RULER scores them. `longctx eval ruler` runs them.

A sample is one text encoded once: the task's instruction, a haystack with the task's needles inserted at the asked
depth, the question and the start of the answer, wrapped in the tokenizer's chat template when it has one. Its length
is the largest haystack whose prompt fits in L tokens (found by searching the number of haystack lines), so prompts
are within one haystack line of L. Prompt wording, haystacks, scoring and where longctx departs from RULER are in
docs/eval.md.
"""

from __future__ import annotations

import math
import random
import re
import string
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longctx.errors import UserError

# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One of RULER's synthetic tasks with its options (RULER's scripts/synthetic.yaml)."""

    name: str
    kind: str
    """niah (needle in a haystack), vt (variable tracking), cwe (common words), fwe (frequent words)."""
    max_new_tokens: int
    """Greedy tokens generated for the answer (RULER's tokens_to_generate)."""
    haystack: str = "filler"
    """niah and vt: filler (one sentence group repeated), text (lines of a corpus), needles (distractor needles)."""
    key_type: str = "words"
    value_type: str = "numbers"
    """niah: what keys and values are: words (adjective-noun), numbers (7 digits) or uuids."""
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    """niah: keys hidden, values per key, keys asked (of the keys hidden)."""
    num_hops: int = 4
    """vt: assignments after the first, each copying the previous variable."""

    @property
    def uses_depth(self) -> bool:
        """niah and vt place their first queried needle at the asked depth; cwe and fwe have no needle."""
        return self.kind in ("niah", "vt")


TASKS = {
    task.name: task
    for task in [
        Task("niah_single_1", "niah", 128, haystack="filler"),
        Task("niah_single_2", "niah", 128, haystack="text"),
        Task("niah_single_3", "niah", 128, haystack="text", value_type="uuids"),
        Task("niah_multikey_1", "niah", 128, haystack="text", num_keys=4),
        Task("niah_multikey_2", "niah", 128, haystack="needles"),
        Task("niah_multikey_3", "niah", 128, haystack="needles", key_type="uuids", value_type="uuids"),
        Task("niah_multivalue", "niah", 128, haystack="text", num_values=4),
        Task("niah_multiquery", "niah", 128, haystack="text", num_keys=4, num_queries=4),
        Task("vt", "vt", 30, haystack="filler"),
        Task("cwe", "cwe", 120),
        Task("fwe", "fwe", 50),
    ]
}

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type} for {key} is: {value}."
TYPE_NAMES = {"numbers": ("number", "numbers"), "words": ("word", "words"), "uuids": ("uuid", "uuids")}

# Keys and word values are adjective-noun pairs, as RULER's (which draws them from the wonderwords lists).
ADJECTIVES = """
abundant adorable agreeable alert ancient angry anxious aquatic average bashful bitter black blue bold brave brief
bright broad bumpy calm careful charming cheerful chilly clever cloudy clumsy colossal cool crazy crooked curly damp
dark dazzling defiant delicate delightful dizzy dry dull eager early elated elegant empty energetic fair faithful
famous fancy fierce filthy flat fluffy foolish fragile friendly frosty fuzzy gentle giant glamorous gleaming glossy
golden graceful grumpy handsome happy heavy helpful hollow homely honest huge humble hungry icy imaginary innocent
jolly juicy kind large lazy light little lively lonely loud lucky magnificent massive mellow misty modern muddy
narrow nervous nimble noisy obedient odd orange polite proud purple quaint quick quiet rapid rare red rich rough
round rusty salty scary shallow shiny shy silent silly slimy slow smooth soft sour sparkling spicy steep sticky
stormy strange striped sturdy sweet swift tall tame tender thirsty tidy tiny tough ugly vast violet warm wicked wide
wild windy wise witty wooden yellow young zany zealous
""".split()
NOUNS = """
acorn airport anchor angle ankle apple apron arch arrow attic autumn badge bakery balloon banana banjo barn basket
beach beacon beard bell bench berry bicycle blanket blossom boat bonnet boot bottle boulder bracelet branch bread
breeze brick bridge broom bucket bugle butter button cabin cable cactus camel candle canoe canyon carpet carrot
castle cellar chair chalk cherry chimney cider circle cliff clock cloud clover coast coconut comet compass cookie
copper cottage crayon creek crown cushion daisy desert diamond dolphin donkey dragon drum eagle easel elbow engine
falcon feather fence ferry fiddle field flame flute forest fountain garden garlic gate giraffe glacier glove goose
guitar hammer harbor harp helmet hill honey horizon island jacket jungle kettle kitten ladder lagoon lantern lemon
library lizard magnet mango maple marble meadow mirror mitten monkey mountain napkin needle nest oasis ocean orchard
otter oyster paddle palace panda parrot peach pebble pencil pepper piano pillow planet pocket pond puzzle quilt
rabbit radish raven ribbon river rocket saddle sailor salmon sandal scarf shovel spoon squirrel statue stream sunset
teapot temple thimble thunder tiger tower trumpet tulip tunnel turtle umbrella valley violin volcano wagon walnut
whistle window wizard yacht zebra
""".split()
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def draw(rng: random.Random, kind: str) -> str:
    """A random key or value: an adjective-noun pair, a 7-digit number or a UUID-like string (RULER's three kinds)."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def made_up_word(rng: random.Random) -> str:
    """A pronounceable word of 2 or 3 syllables (cwe's words: any number of them, the same on every machine)."""
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.choice((2, 3))))


# ----------------------------------------------------------------------------------------------------------------
# Haystacks
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Lines of real text that `text` haystacks are cut from (blank lines dropped), and where they came from."""

    lines: list[str]
    source: str

    def window(self, start: int, num_lines: int) -> list[str]:
        """num_lines consecutive lines from `start`, wrapping round to the beginning when the corpus runs out."""
        return [self.lines[(start + i) % len(self.lines)] for i in range(num_lines)]


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
MAX_CORPUS_CHARS = 32_000_000


def stdlib_corpus_files() -> list[Path]:
    """The default corpus: the top-level modules of the Python standard library (on every machine that runs longctx)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def load_corpus(path: str | Path | None, tokenizer) -> Corpus:
    """Text for `text` haystacks: a text file, a directory of .txt/.md/.rst/.py files (sorted, recursively), a held-out
    shard directory (its documents decoded with `tokenizer`, which must be the one they were packed with), or, when
    path is None, the standard library's top-level modules."""
    if path is None:
        return _corpus_from_files(stdlib_corpus_files(), f"python {sys.version.split()[0]} standard library")
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"haystack text {path} does not exist: give a text file, a directory of them, or held-out shards"
        )
    if path.is_file():
        return _corpus_from_files([path], str(path))
    if (path / "manifest.json").is_file():
        return _corpus_from_shards(path, tokenizer)
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    return _corpus_from_files(files, str(path))


def _corpus_from_files(files: list[Path], source: str) -> Corpus:
    lines: list[str] = []
    num_chars = 0
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        lines += [line.rstrip() for line in text.splitlines() if line.strip()]
        num_chars += len(text)
        if num_chars > MAX_CORPUS_CHARS:
            break
    if not lines:
        raise UserError(f"haystack text {source} holds no text lines: give files ending in {', '.join(TEXT_SUFFIXES)}")
    return Corpus(lines, source)


def _corpus_from_shards(shard_dir: Path, tokenizer) -> Corpus:
    """The documents of a shard set, decoded: split at the document delimiters, which never reach the text."""
    from longctx.evaluate import load_heldout_stream

    stream = load_heldout_stream(shard_dir, max_tokens=MAX_CORPUS_CHARS // 8).tolist()
    delimiters = {i for i in tokenizer.document_delimiters() if i is not None}
    documents, current = [], []
    for token in stream:
        if token in delimiters:
            documents.append(current)
            current = []
        else:
            current.append(token)
    documents.append(current)
    text = "\n".join(tokenizer.decode(doc) for doc in documents if doc)
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"haystack shards {shard_dir} decode to no text: give another --haystack-text")
    return Corpus(lines, str(shard_dir))


# ----------------------------------------------------------------------------------------------------------------
# Samples: what a task draws (independent of the haystack's size), then the text for a given number of lines
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    task: str
    length: int
    depth: float | None
    index: int
    token_ids: list[int]
    """At most `length` tokens: one text (chat template applied, or the document-start token before it) encoded once."""
    text: str
    """The text that was encoded."""
    outputs: list[str]
    """The references: every one must appear in the answer (RULER's string_match_all)."""
    haystack_lines: int


@dataclass
class Draw:
    """A sample's random content, drawn before its size is known, so the prompt grows with the haystack only."""

    outputs: list[str]
    render: Callable[[int], tuple[str, str, str]]
    """Number of haystack units -> (instruction and context, question, answer prefix)."""


def _insert(lines: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Each needle as its own line before line round(fraction * len(lines)) (fraction 1: after the last line); needles
    at the same place keep their order."""
    out = list(lines)
    places = [min(len(lines), round(fraction * len(lines))) for fraction, _ in needles]
    for offset, (place, (_, needle)) in enumerate(sorted(zip(places, needles), key=lambda p: p[0])):
        out.insert(place + offset, needle)
    return out


def draw_niah(task: Task, rng: random.Random, depth: float, corpus: Corpus | None, corpus_start: int) -> Draw:
    """Needles "One of the special magic {values} for {key} is: {value}." in the haystack; the first queried needle at
    `depth`, the others at random depths; the question asks for the values of num_queries keys."""
    keys: list[str] = []
    while len(keys) < task.num_keys:
        key = draw(rng, task.key_type)
        keys += [key] if key not in keys else []
    values = [[draw(rng, task.value_type) for _ in range(task.num_values)] for _ in keys]
    queried = rng.sample(range(task.num_keys), task.num_queries)
    singular, plural = TYPE_NAMES[task.value_type]
    needles = [NEEDLE.format(type=plural, key=keys[k], value=v) for k in range(task.num_keys) for v in values[k]]
    first = queried[0] * task.num_values  # the first value of the first key asked
    placed = [(depth if i == first else rng.random(), needle) for i, needle in enumerate(needles)]
    query_keys = [keys[k] for k in queried]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    outputs = [v for k in queried for v in values[k]]
    distractor_seed = rng.getrandbits(64)

    def haystack(num_lines: int) -> list[str]:
        if task.haystack == "filler":
            return [FILLER] * num_lines
        if task.haystack == "text":
            return corpus.window(corpus_start, num_lines)
        lines = []  # needles: distractor i is the same whatever the number of lines, so prompts grow monotonically
        for i in range(num_lines):
            line_rng = random.Random(f"{distractor_seed}/{i}")
            key = draw(line_rng, task.key_type)
            while key in keys:
                key = draw(line_rng, task.key_type)
            lines.append(NEEDLE.format(type=plural, key=key, value=draw(line_rng, task.value_type)))
        return lines

    def render(num_lines: int) -> tuple[str, str, str]:
        context = "\n".join(_insert(haystack(num_lines), placed))
        if len(outputs) == 1:
            intro = f"A special magic {singular} is hidden within the following text."
            question = f"What is the special magic {singular} for {query} mentioned in the provided text?"
            prefix = f"The special magic {singular} for {query} mentioned in the provided text is"
            about = singular
        else:
            intro = f"Some special magic {plural} are hidden within the following text."
            question = f"What are all the special magic {plural} for {query} mentioned in the provided text?"
            prefix = f"The special magic {plural} for {query} mentioned in the provided text are"
            about = plural
        instruction = f"{intro} Make sure to memorize it. I will quiz you about the {about} afterwards."
        return f"{instruction}\n{context}", question, prefix

    return Draw(outputs, render)


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


def _chain(rng: random.Random, num_hops: int) -> tuple[list[str], list[str], str]:
    """(assignment lines, variable names, value): VAR A = 12345, VAR B = VAR A, ... (RULER's variable tracking)."""
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = _variable_name(rng)
        names += [name] if name not in names else []
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(num_hops)]
    return lines, names, value


VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_EXAMPLE_LINES = 4  # filler lines of the one-shot example (RULER's example is sized to 500 tokens)


def _vt_text(context: str, value: str, num_names: int) -> tuple[str, str, str]:
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {num_names} variables are "
        f"assigned the value {value}, they are:"
    )
    return f"{VT_INSTRUCTION}\n\n{context}", question, prefix


def draw_vt(task: Task, rng: random.Random, depth: float) -> Draw:
    """One chain of num_hops + 1 assignments in filler lines, its first (the value) at `depth`, the others later at
    random depths, in order; asked: every variable that holds the value. A worked example comes first, as in RULER."""
    example_lines, example_names, example_value = _chain(rng, task.num_hops)
    example_places = sorted(rng.random() for _ in example_lines)
    example_context = "\n".join(_insert([FILLER] * VT_EXAMPLE_LINES, list(zip(example_places, example_lines))))
    instruction, question, prefix = _vt_text(example_context, example_value, len(example_names))
    example = f"{instruction}\n{question} {prefix} {' '.join(example_names)}\n"
    lines, names, value = _chain(rng, task.num_hops)
    places = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in lines[1:])

    def render(num_lines: int) -> tuple[str, str, str]:
        context = "\n".join(_insert([FILLER] * num_lines, list(zip(places, lines))))
        instruction, question, prefix = _vt_text(context, value, len(names))
        return example + instruction, question, prefix

    return Draw(names, render)


CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often."
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
CWE_NUM_COMMON = 10


def _word_list(rng: random.Random, words: list[str], common_repeats: int, rare_repeats: int) -> str:
    """The first 10 words `common_repeats` times, the others `rare_repeats` times, shuffled: "1. w 2. w ..."."""
    entries = words[:CWE_NUM_COMMON] * common_repeats + words[CWE_NUM_COMMON:] * rare_repeats
    rng.shuffle(entries)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))


def draw_cwe(task: Task, rng: random.Random, length: int) -> Draw:
    """A numbered list in which 10 words appear often and the others rarely (30 and 3 times; 6 and 1 below 4096
    tokens, as RULER); asked: the 10 common ones. A worked example comes first, as in RULER."""
    short = length < 4096
    words: list[str] = []
    seen: set[str] = set()

    def words_up_to(count: int) -> list[str]:
        while len(words) < count:
            word = made_up_word(rng)
            if word not in seen:
                seen.add(word)
                words.append(word)
        return words[:count]

    example_words = list(words_up_to(20 if short else 40))
    example_list = _word_list(rng, example_words, *((3, 1) if short else (10, 3)))
    answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_words[:CWE_NUM_COMMON]))
    example = f"{CWE_INSTRUCTION}\n{example_list}\n{CWE_QUESTION} {CWE_PREFIX} {answer}\n"
    list_seed = rng.getrandbits(64)
    repeats = (6, 1) if short else (30, 3)
    common = words_up_to(len(example_words) + CWE_NUM_COMMON)[len(example_words) :]

    def render(num_words: int) -> tuple[str, str, str]:
        chosen = words_up_to(len(example_words) + CWE_NUM_COMMON + num_words)[len(example_words) :]
        word_list = _word_list(random.Random(list_seed), chosen, *repeats)
        return f"{example}{CWE_INSTRUCTION}\n{word_list}", CWE_QUESTION, CWE_PREFIX

    return Draw(list(common), render)


FWE_ALPHA = 2.0
FWE_WORD_LETTERS = 6


def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha), alpha > 1: the partial sum plus its Euler-Maclaurin tail."""
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2


def draw_fwe(task: Task, rng: random.Random, length: int) -> Draw:
    """Coded words (6 random letters) with Zipf counts (alpha 2); the most frequent is '....' noise; asked: the three
    most frequent coded words (RULER's frequent words extraction, vocabulary of length / 50 words)."""
    vocab_size = max(5, (length - task.max_new_tokens) // 50)
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LETTERS))
        vocab += [word] if word not in vocab else []
    vocab[0] = "...."
    shuffle_seed = rng.getrandbits(64)
    zeta = _zeta(FWE_ALPHA)

    def render(num_words: int) -> tuple[str, str, str]:
        counts = [int(num_words * k**-FWE_ALPHA / zeta) for k in range(1, len(vocab) + 1)]
        coded = [word for word, count in zip(vocab, counts) for _ in range(count)]
        random.Random(shuffle_seed).shuffle(coded)
        instruction = (
            "Read the following coded text and track the frequency of each coded word. Find the three most "
            f"frequently appeared coded words. {' '.join(coded)}"
        )
        question = (
            "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?"
        )
        return (
            instruction,
            question,
            "Answer: According to the coded text above, the three most frequently appeared words are:",
        )

    return Draw(vocab[1:4], render)


# ----------------------------------------------------------------------------------------------------------------
# Prompts: the chat template (when the tokenizer has one) and the fit to the context length
# ----------------------------------------------------------------------------------------------------------------


class PromptFormat:
    """Turns (task text, question, answer prefix) into the text the model reads, and that text into token ids.

    With a chat template: one user turn holding the task and the question, the generation prompt, then the answer
    prefix (the model continues the assistant's answer). Without: task, newline, question, space, answer prefix, after
    the tokenizer's document-start token (what the model saw at the start of every training document).
    """

    def __init__(self, tokenizer, chat_template: Callable[[str], str] | None):
        from longctx.evaluate import _prompt_start

        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.start = [] if chat_template else _prompt_start(tokenizer)

    def text(self, task_text: str, question: str, prefix: str) -> str:
        if self.chat_template is None:
            return f"{task_text}\n{question} {prefix}"
        return self.chat_template(f"{task_text}\n{question}") + prefix

    def encode(self, text: str) -> list[int]:
        return self.start + self.tokenizer.encode(text)


def load_chat_template(tokenizer_path: str | Path) -> Callable[[str], str] | None:
    """user message -> the chat text up to the assistant's turn, from a tokenizer directory's chat template; None when
    it has none (a sentencepiece file, a base model)."""
    import json

    path = Path(tokenizer_path)
    if not path.is_dir():
        return None
    config_file = path / "tokenizer_config.json"
    in_config = config_file.is_file() and "chat_template" in json.loads(config_file.read_text() or "{}")
    if not (in_config or (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()):
        return None
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)

    def apply(message: str) -> str:
        messages = [{"role": "user", "content": message}]
        return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return apply


def fit(draw_: Draw, fmt: PromptFormat, length: int, start_hint: int) -> tuple[list[int], str, int]:
    """(token ids, text, haystack units) of the largest haystack whose prompt has at most `length` tokens.

    The prompt grows with the number of units, so the answer is the n with fits(n) and not fits(n + 1): found by
    galloping from start_hint (the previous sample's n, usually right or next to it) and bisection, the same n from
    any hint. None when not even one unit fits: the length is too short for the task."""

    def encoded(n: int) -> tuple[list[int], str]:
        text = fmt.text(*draw_.render(n))
        return fmt.encode(text), text

    def fits(n: int) -> bool:
        return len(encoded(n)[0]) <= length

    if not fits(1):
        return None
    low = max(1, start_hint)
    if not fits(low):
        low, high = 1, low
    else:
        step = 1
        high = low + step
        while fits(high):
            low, high, step = high, high + 2 * step, 2 * step
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    ids, text = encoded(low)
    return ids, text, low


def task_draw(task: Task, rng: random.Random, length: int, depth: float | None, corpus, corpus_start: int) -> Draw:
    if task.kind == "niah":
        return draw_niah(task, rng, depth, corpus, corpus_start)
    if task.kind == "vt":
        return draw_vt(task, rng, depth)
    if task.kind == "cwe":
        return draw_cwe(task, rng, length)
    return draw_fwe(task, rng, length)


def generate_samples(
    tasks: Sequence[Task],
    lengths: Sequence[int],
    depths: Sequence[float],
    num_samples: int,
    fmt: PromptFormat,
    *,
    seed: int = 0,
    corpus: Corpus | None = None,
) -> list[Sample]:
    """Every sample of every (task, length, depth), in running order: by task and length, deepest first (so that
    consecutive prompts share the longest prefix; see `GreedyDecoder`). Each sample's content comes from its own
    random stream, seeded by (seed, task, length, depth, index): a sample is the same whatever else is asked."""
    samples = []
    for task in tasks:
        corpus_start = random.Random(f"{seed}/{task.name}/haystack").randrange(len(corpus.lines)) if corpus else 0
        for length in lengths:
            hint = 0
            for depth in sorted(depths, reverse=True) if task.uses_depth else [None]:
                for index in range(num_samples):
                    rng = random.Random(f"{seed}/{task.name}/{length}/{depth}/{index}")
                    draw_ = task_draw(task, rng, length, depth, corpus, corpus_start)
                    fitted = fit(draw_, fmt, length, hint)
                    if fitted is None:
                        shortest = len(fmt.encode(fmt.text(*draw_.render(1))))
                        raise UserError(
                            f"length {length} is too short for task {task.name}: its prompt needs {shortest} tokens "
                            f"with this tokenizer; use lengths >= {shortest} (several times that to test anything) "
                            "or drop the task"
                        )
                    ids, text, hint = fitted
                    samples.append(Sample(task.name, length, depth, index, ids, text, draw_.outputs, hint))
    return samples


# Every kind of text the generators write (the filler, needles of each kind, variables, coded words), and that the
# scorer looks for in the answer: a tokenizer must give it back word for word.
ENCODING_PROBE = "\n".join(
    [
        FILLER,
        NEEDLE.format(type="numbers", key="bold-acorn", value="1234567"),
        NEEDLE.format(type="uuids", key="0f3c2b7e-9a41-4d6b-8e2f-5c1a7b9d3e60", value="tiny-zebra"),
        "VAR QWERT = 12345",
        "VAR ZXCVB = VAR QWERT",
        "1. kamoru 2. ....",
    ]
)


def check_encodes(tokenizer) -> None:
    """Refuse a tokenizer that loses the generated text (no byte fallback: letters become <unk>), which would make
    the needles unreadable to any model."""
    want = ENCODING_PROBE.split()
    got = tokenizer.decode(tokenizer.encode(ENCODING_PROBE)).split()
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        word = want[first] if first < len(want) else want[-1]
        raise UserError(
            f"the tokenizer cannot encode the tasks' filler and needles (it does not give back {word!r}): use the "
            "model's own tokenizer with --tokenizer (or a tokenizer with byte fallback)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Scoring (RULER's scripts/eval: postprocess, string_match_all, string_match_part)
# ----------------------------------------------------------------------------------------------------------------

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess(answer: str) -> str:
    """Strip, and turn control characters into newlines (RULER's postprocess_pred)."""
    return _NON_PRINTABLE.sub("\n", answer.strip()).strip()


def string_match_all(answer: str, references: Sequence[str]) -> float:
    """Fraction of the references found in the answer, case-insensitive (RULER's score for every synthetic task)."""
    answer = postprocess(answer).lower()
    return sum(ref.lower() in answer for ref in references) / len(references)


def string_match_part(answer: str, references: Sequence[str]) -> float:
    """1 if any reference is found in the answer, else 0 (RULER's score for its QA tasks; reported beside)."""
    answer = postprocess(answer).lower()
    return float(any(ref.lower() in answer for ref in references))


# ----------------------------------------------------------------------------------------------------------------
# Greedy decoding that reuses the previous prompt's KV cache for the prefix they share
# ----------------------------------------------------------------------------------------------------------------


class GreedyDecoder:
    """decoder(prompt ids, max new tokens, done) -> new ids, greedy, with dense attention and a KV cache.

    The cache of the previous prompt is kept, cut back to the prefix the next prompt shares with it: samples of one
    task and length share their instruction and the haystack before their first needle, so deepest-first order
    recomputes only the rest. The logits are those of a whole-prompt forward up to floating-point rounding (a layer
    whose cache cannot be cut back exactly, e.g. sliding-window, makes every prompt start afresh). Decoding stops at an
    end-of-sequence id, after max new tokens, or when `done(new ids)` says the answer is complete.
    """

    def __init__(self, model, stop_ids: set[int]):
        import inspect

        self.model = model
        self.device = next(model.parameters()).device
        self.stop_ids = stop_ids
        # transformers renamed the KV cache argument (past_key_values -> cache)
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = None
        self.cached_ids: list[int] = []
        self.num_reused = 0

    def __call__(self, prompt_ids: list[int], max_new_tokens: int, done: Callable[[list[int]], bool] | None = None):
        import torch

        with torch.inference_mode():
            shared = self._reuse(prompt_ids)
            self.num_reused += shared
            output = self._forward(prompt_ids[shared:], logits_to_keep=1)
            self.cached_ids = list(prompt_ids)
            new_ids: list[int] = []
            for _ in range(max_new_tokens):
                next_id = int(output.logits[0, -1].argmax())  # host sync: one per generated token
                if next_id in self.stop_ids:
                    break
                new_ids.append(next_id)
                if done is not None and done(new_ids):
                    break
                output = self._forward([next_id])
            self._keep(len(prompt_ids))  # the prompt's part only
        return new_ids

    def _reuse(self, prompt_ids: list[int]) -> int:
        """Tokens of prompt_ids whose keys and values are in the cache already (at least one is left to compute)."""
        from transformers import DynamicCache

        shared = 0
        limit = min(len(self.cached_ids), len(prompt_ids) - 1)
        while shared < limit and self.cached_ids[shared] == prompt_ids[shared]:
            shared += 1
        if self.cache is None or shared == 0 or not self.cache.is_croppable or any(self.cache.is_sliding):
            self.cache = DynamicCache(config=self.model.config)
            return 0
        self._keep(shared)
        return shared

    def _keep(self, num_tokens: int) -> None:
        # A negative crop removes that many tokens in every transformers version (a positive one meant the length
        # to keep in 4.x and is refused in 5.x).
        extra = self.cache.get_seq_length() - num_tokens
        if extra > 0:
            self.cache.crop(-extra)

    def _forward(self, ids: list[int], **kwargs):
        import torch

        input_ids = torch.tensor([ids], device=self.device)
        return self.model(input_ids=input_ids, use_cache=True, **{self.cache_name: self.cache}, **kwargs)


def stop_ids(path: str | Path, config) -> set[int]:
    """The ids that end generation: generation_config.json's eos_token_id, else config.json's."""
    import json

    eos = None
    generation_config = Path(path) / "generation_config.json"
    if generation_config.is_file():
        try:
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise UserError(f"{generation_config} is not valid JSON ({e}): fix or delete it") from None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        raise UserError(
            f"model {path} names no end-of-sequence token (eos_token_id in generation_config.json or config.json): "
            'add one, e.g. generation_config.json {"eos_token_id": 2}, so that answers can end'
        )
    return set(eos if isinstance(eos, list) else [eos])


# ----------------------------------------------------------------------------------------------------------------
# The command: `longctx eval ruler`
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RulerArgs:
    """What `longctx eval ruler` was asked (cli.py builds it from argv)."""

    models: dict[str, str]
    """name -> Hugging Face model directory, checkpoint or training run."""
    lengths: list[int]
    out: Path
    tokenizer: str = ""
    """Default: the first model's directory."""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 5
    """Samples per (task, length, depth); per (task, length) for cwe and fwe, which have no depth."""
    seed: int = 0
    haystack_text: str | None = None
    """Corpus of `text` haystacks: a file, a directory of text files or held-out shards (default: the stdlib)."""
    chat_template: bool = True
    """Apply the tokenizer's chat template when it has one."""
    device_map: str = "none"
    """none: each model on one device; balanced: its layers spread over every visible GPU (longctx.placement)."""
    max_new_tokens: int = 0
    """Cap on the tokens generated per answer (0: each task's RULER budget)."""


def parse_tasks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    chosen: list[str] = []
    for name in names:
        matching = [task for task in TASKS if task == name or (name.endswith("*") and task.startswith(name[:-1]))]
        if not matching:
            raise UserError(f"unknown task {name!r}: choose among {', '.join(TASKS)} (or a prefix with *, e.g. niah*)")
        chosen += [task for task in matching if task not in chosen]
    if not chosen:
        raise UserError("--tasks is empty: give e.g. niah_single_1,vt or all")
    return chosen


def _validate(args: RulerArgs) -> None:
    if not args.tasks:
        raise UserError("no task given: give e.g. --tasks niah_single_1,vt")
    if any(not 0 <= d <= 1 for d in args.depths):
        raise UserError(f"depths {args.depths} must lie in [0, 1]: 0 is the start of the haystack, 1 its end")
    if args.samples < 1:
        raise UserError(f"samples {args.samples} must be >= 1")
    if args.max_new_tokens < 0:
        raise UserError(f"max new tokens {args.max_new_tokens} must be >= 0 (0: each task's RULER budget)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"output {args.out} is a file: give a directory for the results")


def prepare(args: RulerArgs):
    """Everything that can be refused, checked before any model is loaded or anything written: (tokenizer, prompt
    format, corpus, samples, stop ids per model)."""
    from data_prep.tokenizer import load_tokenizer
    from longctx.evaluate import _tokenizer_beside, check_context_reach, eval_model_config
    from longctx.placement import check_device_map

    _validate(args)
    check_device_map(args.models, args.device_map)
    tokenizer_path = args.tokenizer or _tokenizer_beside(next(iter(args.models.values())))
    tokenizer = load_tokenizer(tokenizer_path)
    tasks = [TASKS[name] for name in args.tasks]
    corpus = load_corpus(args.haystack_text, tokenizer) if any(t.haystack == "text" for t in tasks) else None
    check_encodes(tokenizer)
    chat_template = load_chat_template(tokenizer_path) if args.chat_template else None
    fmt = PromptFormat(tokenizer, chat_template)
    samples = generate_samples(tasks, args.lengths, args.depths, args.samples, fmt, seed=args.seed, corpus=corpus)
    stops = {}
    for name, path in args.models.items():
        config = eval_model_config(path)
        stops[name] = stop_ids(path, config)
        check_context_reach(config, args.lengths, name)
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but {name} has {config.vocab_size} token "
                "embeddings: give the model's own tokenizer with --tokenizer"
            )
    return tokenizer, fmt, corpus, samples, stops


def answer_samples(
    model, tokenizer, samples: list[Sample], stops: set[int], *, max_new_tokens: int = 0, progress: bool = False
) -> list[dict]:
    """Each sample answered greedily (at most max_new_tokens, when > 0, else the task's budget) and scored; under
    torch.distributed each rank takes a contiguous share (keeping shared prefixes together), answers are gathered."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from longctx.evaluate import _rank_and_world

    rank, world_size = _rank_and_world()
    share = math.ceil(len(samples) / world_size)
    mine = range(rank * share, min(len(samples), (rank + 1) * share))
    decoder = GreedyDecoder(model, stops)
    answers = []
    for index in tqdm(mine, desc="ruler", disable=not progress or rank != 0):
        sample = samples[index]

        def done(new_ids: list[int], outputs=sample.outputs) -> bool:  # the score cannot change once all are found
            return string_match_all(tokenizer.decode(new_ids), outputs) == 1.0

        started = time.perf_counter()
        budget = min(filter(None, (max_new_tokens, TASKS[sample.task].max_new_tokens)))
        answer = tokenizer.decode(decoder(sample.token_ids, budget, done))
        answers.append(
            {
                "task": sample.task,
                "length": sample.length,
                "depth": sample.depth,
                "index": sample.index,
                "prompt_tokens": len(sample.token_ids),
                "outputs": sample.outputs,
                "answer": answer,
                "score": string_match_all(answer, sample.outputs),
                "score_part": string_match_part(answer, sample.outputs),
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    if world_size > 1:
        gathered: list[list[dict]] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, answers)
        answers = [a for part in gathered for a in part]
    return answers


def summarize(answers: list[dict], tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float]) -> dict:
    """Per task: scores in percent, [depth row][length column] (one row, depth null, for cwe and fwe), and the mean
    over depths per length; plus the mean over tasks per length (RULER's average)."""

    def mean(key: str, items: list[dict]) -> float:
        return round(100 * sum(a[key] for a in items) / len(items), 2)

    by_task = {}
    for name in tasks:
        rows = sorted(depths) if TASKS[name].uses_depth else [None]
        cells: dict[tuple[int, float | None], list[dict]] = {}
        for a in answers:
            if a["task"] == name:
                cells.setdefault((a["length"], a["depth"]), []).append(a)
        by_task[name] = {
            "depths": rows,
            "score": [[mean("score", cells[(n, d)]) for n in lengths] for d in rows],
            "score_part": [[mean("score_part", cells[(n, d)]) for n in lengths] for d in rows],
            "by_length": {
                n: mean("score", [a for a in answers if a["task"] == name and a["length"] == n]) for n in lengths
            },
        }
    average = {n: round(sum(t["by_length"][n] for t in by_task.values()) / len(by_task), 2) for n in lengths}
    return {"tasks": by_task, "average": average}


def format_table(name: str, summary: dict, lengths: Sequence[int]) -> str:
    """Tasks as rows, lengths as columns: string_match_all in percent, averaged over depths (RULER's table)."""
    width = max(len("average"), *(len(task) for task in summary["tasks"]))
    lines = [f"{name}: RULER score (%, string_match_all)", "task".ljust(width) + "".join(f"{n:>8}" for n in lengths)]
    for task, result in summary["tasks"].items():
        lines.append(task.ljust(width) + "".join(f"{result['by_length'][n]:>8.1f}" for n in lengths))
    lines.append("average".ljust(width) + "".join(f"{summary['average'][n]:>8.1f}" for n in lengths))
    return "\n".join(lines)


def plot_heatmap(result: dict, lengths: Sequence[int], path: Path, title: str) -> None:
    """Depth (rows) against length (columns), score in percent, one cell per (depth, length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from longctx.atomic import save_figure_atomic

    scores = result["score"]
    rows = ["any" if d is None else f"{d:g}" for d in result["depths"]]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.5 * len(rows) + 1.8))
    image = ax.imshow(scores, vmin=0.0, vmax=100.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(rows)), rows)
    for row in range(len(rows)):
        for col in range(len(lengths)):
            ax.text(col, row, f"{scores[row][col]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the first needle")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score (%)")
    save_figure_atomic(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def evaluate_ruler(args: RulerArgs) -> dict[str, Any]:
    """Every model on every sample. Rank 0 prints a table per model and writes ruler.json (returned) and a heat map per
    task and model, ruler_<model>_<task>.png, to args.out. Nothing is written when an argument is refused."""
    from longctx.atomic import write_json_atomic
    from longctx.evaluate import _rank_and_world, init_distributed_from_env
    from longctx.placement import load_for_eval

    init_distributed_from_env()
    tokenizer, fmt, corpus, samples, stops = prepare(args)
    lengths = sorted(args.lengths)
    results = {}
    for name, path in args.models.items():
        started = time.perf_counter()
        model = load_for_eval(path, args.device_map)
        answers = answer_samples(
            model, tokenizer, samples, stops[name], max_new_tokens=args.max_new_tokens, progress=True
        )
        results[name] = {
            "path": str(path),
            **summarize(answers, args.tasks, lengths, args.depths),
            "seconds": round(time.perf_counter() - started, 1),
            "answers": answers,
        }
        del model
    report = {
        "seed": args.seed,
        "lengths": lengths,
        "depths": sorted(args.depths),
        "samples_per_cell": args.samples,
        "max_new_tokens": args.max_new_tokens or "each task's",
        "tokenizer": str(tokenizer.path),
        "chat_template": fmt.chat_template is not None,
        "haystack_text": corpus.source if corpus else None,
        "tasks": {name: asdict(TASKS[name]) for name in args.tasks},
        "models": results,
    }
    if _rank_and_world()[0] == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "ruler.json", report, sort_keys=False)
        for name, result in results.items():
            for task, task_result in result["tasks"].items():
                plot_heatmap(task_result, lengths, out / f"ruler_{name}_{task}.png", f"{name}: {task}")
            print(format_table(name, result, lengths))
        print(f"{len(samples)} samples per model; wrote {out / 'ruler.json'} and a heat map per task and model")
    return report
