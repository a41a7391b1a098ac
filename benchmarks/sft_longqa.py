"""Long-document QA before and after a short LongLoRA SFT run on a real instruction model (SmolLM2-135M-Instruct).

The task, built offline from the Python standard library's sources: a stretch of a module's code of about L tokens,
then "In the code above, what is the default value of parameter `p` of function `f`? Answer with the value only,
exactly as written in the code." The answer is the default's source text (`None`, `'strict'`, `-1`, ...), read with
`ast`; the function is defined once in the stretch, at a random depth. Modules are split into train and held-out
(every 4th module, by name, is held out), so no held-out document is seen in training. At most a quarter of the
questions have the answer `None`; the accuracy of always answering `None` is reported beside the model's.

    stdlib modules → train conversations (a code stretch of 250-850 tokens, then 3 questions as 3 user turns, every
    answer trained) → `longctx prep sft` (the model's chat template, packed at --train-len, isolated)
    → held-out questions at each of --lengths tokens → greedy answers of the model as it is
    → `longctx train` (S²-Attn, LoRA r=8 on q/k/v/o + embeddings + norms, --steps steps) → the same questions again

Scoring: exact (the answer, stripped of whitespace, equals the default's source text) and contained (the default's
source text appears in the answer as a whole token: the untrained model answers in a sentence). Greedy decoding, up
to 32 new tokens, fp32 on CPU; the questions about one stretch share its prefilled KV cache.

    .venv/bin/python benchmarks/sft_longqa.py                      # ~17 min on 2 idle CPU cores
    .venv/bin/python benchmarks/sft_longqa.py --steps 2 --questions 1 --lengths 512 --out /tmp/quick.json

Writes benchmarks/results/sft_longqa.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))

QUESTION = (
    "In the code above, what is the default value of parameter `{param}` of function `{function}`? "
    "Answer with the value only, exactly as written in the code."
)
MAX_DEFAULT_CHARS = 30
MAX_NEW_TOKENS = 32
QUESTIONS_PER_TRAIN_CONVERSATION = 3
QUESTIONS_PER_STRETCH = 4  # held-out questions asked about one stretch (sharing its KV cache)


# ----------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------


def module_facts(path: Path) -> tuple[list[str], list[dict]] | None:
    """(source lines, [{function, param, default, first, last}]) of one module; None if it does not parse."""
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    facts = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = node.args
        positional = args.posonlyargs + args.args
        pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        for arg, default in pairs:
            text = ast.get_source_segment(source, default)
            if text and "\n" not in text and len(text) <= MAX_DEFAULT_CHARS:
                last = node.body[0].lineno - 1 if node.body else node.lineno  # the signature may span lines
                facts.append(
                    {"function": node.name, "param": arg.arg, "default": text, "first": node.lineno - 1, "last": last}
                )
    return source.splitlines(), facts


def stdlib_modules(tokenizer, min_tokens: int) -> list[tuple[str, list[str], list[int], list[dict]]]:
    """(name, lines, tokens per line, facts) of the standard library's top-level modules long enough for the task."""
    modules = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if path.stat().st_size < 2 * min_tokens:  # code runs ~3-4 characters per token: too short anyway
            continue
        found = module_facts(path)
        if found is None or len(found[1]) < 10:
            continue
        lines, facts = found
        line_tokens = [len(ids) for ids in tokenizer.encode_batch([line + "\n" for line in lines])]
        if sum(line_tokens) >= min_tokens:
            modules.append((path.stem, lines, line_tokens, facts))
    return modules


def stretch(lines, line_tokens, fact, budget: int, rng) -> tuple[int, int]:
    """Lines [start, end) of about `budget` tokens holding the fact's signature at a random depth."""
    before = int(rng.uniform(0.05, 0.95) * budget)
    start, end = fact["first"], fact["last"] + 1
    used = sum(line_tokens[start:end])
    while start > 0 and used + line_tokens[start - 1] <= before:
        start -= 1
        used += line_tokens[start]
    while end < len(lines) and used + line_tokens[end] <= budget:
        used += line_tokens[end]
        end += 1
    while start > 0 and used + line_tokens[start - 1] <= budget:  # the module ended first: extend backwards
        start -= 1
        used += line_tokens[start]
    return start, end


def unique_facts(lines, facts, start: int, end: int) -> list[dict]:
    """Facts whose whole signature lies in [start, end) and whose function is defined only once there."""
    text = "\n".join(lines[start:end])
    return [
        f
        for f in facts
        if start <= f["first"]
        and f["last"] < end
        and len(re.findall(rf"\bdef {re.escape(f['function'])}\(", text)) == 1
    ]


def pick(candidates: list[dict], count: int, rng, none_share: float = 0.25) -> list[dict]:
    """Up to `count` distinct facts, at most `none_share` of them with the answer None."""
    chosen, nones = [], 0
    for k in rng.permutation(len(candidates)):
        fact = candidates[k]
        if fact["default"] == "None" and nones + 1 > none_share * count:
            continue
        chosen.append(fact)
        nones += fact["default"] == "None"
        if len(chosen) == count:
            break
    return chosen


def user_turn(code: str, fact: dict) -> str:
    return f"```python\n{code}\n```\n\n" + QUESTION.format(**fact)


def train_conversations(modules, count: int, rng) -> list[dict]:
    conversations = []
    while len(conversations) < count:
        name, lines, line_tokens, facts = modules[rng.integers(len(modules))]
        budget = int(rng.integers(280, 950))  # ~250-850 tokens once joined
        start, end = stretch(lines, line_tokens, facts[rng.integers(len(facts))], budget, rng)
        chosen = pick(unique_facts(lines, facts, start, end), QUESTIONS_PER_TRAIN_CONVERSATION, rng)
        if len(chosen) < QUESTIONS_PER_TRAIN_CONVERSATION:
            continue
        code = "\n".join(lines[start:end])
        messages = [{"role": "user", "content": user_turn(code, chosen[0])}]
        messages.append({"role": "assistant", "content": chosen[0]["default"]})
        for fact in chosen[1:]:
            messages += [
                {"role": "user", "content": QUESTION.format(**fact)},
                {"role": "assistant", "content": fact["default"]},
            ]
        conversations.append({"messages": messages, "module": name})
    return conversations


def heldout_questions(modules, length: int, num_stretches: int, rng, overhead: int) -> list[dict]:
    """num_stretches stretches of `length` prompt tokens, QUESTIONS_PER_STRETCH questions each."""
    stretches = []
    attempts = 0
    while len(stretches) < num_stretches:
        attempts += 1
        assert attempts < 1000, f"no held-out module yields {QUESTIONS_PER_STRETCH} questions at {length} tokens"
        name, lines, line_tokens, facts = modules[rng.integers(len(modules))]
        # Lines tokenized one by one count ~12% more tokens than the same lines joined.
        budget = int((length - overhead) * 1.12)
        start, end = stretch(lines, line_tokens, facts[rng.integers(len(facts))], budget, rng)
        chosen = pick(unique_facts(lines, facts, start, end), QUESTIONS_PER_STRETCH, rng)
        if len(chosen) == QUESTIONS_PER_STRETCH:
            code = "\n".join(lines[start:end])
            stretches.append({"module": name, "lines": [start, end], "code": code, "facts": chosen})
    return stretches


# ----------------------------------------------------------------------------------------------------------------
# Answering
# ----------------------------------------------------------------------------------------------------------------


def answer_all(model_dir: Path, stretches_by_length: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Greedy answers of the model in model_dir to every held-out question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    results = {}
    for length, stretches in stretches_by_length.items():
        rows = []
        for item in stretches:
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": user_turn(item["code"], f)}], add_generation_prompt=True
                )["input_ids"]
                for f in item["facts"]
            ]
            shared = 0  # tokens common to every question's prompt (the code): prefilled once
            while all(len(p) > shared + 1 and p[shared] == prompts[0][shared] for p in prompts):
                shared += 1
            with torch.no_grad():
                cache = DynamicCache(config=model.config)
                model(input_ids=torch.tensor([prompts[0][:shared]]), cache=cache, use_cache=True)
                for fact, prompt in zip(item["facts"], prompts):
                    out = model.generate(
                        torch.tensor([prompt]),
                        cache=copy.deepcopy(cache),
                        max_new_tokens=MAX_NEW_TOKENS,
                        do_sample=False,
                    )
                    response = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
                    rows.append(score(fact, response, len(prompt), item["module"]))
        results[length] = rows
    return results


def score(fact: dict, response: str, prompt_tokens: int, module: str) -> dict:
    answer = fact["default"]
    contained = re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w])", response) is not None
    return {
        "module": module,
        "function": fact["function"],
        "param": fact["param"],
        "answer": answer,
        "response": response,
        "prompt_tokens": prompt_tokens,
        "exact": response.strip() == answer,
        "contained": contained,
    }


def accuracy(rows: list[dict]) -> dict:
    return {
        "questions": len(rows),
        "exact": sum(r["exact"] for r in rows) / len(rows),
        "contained": sum(r["contained"] for r in rows) / len(rows),
        "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / len(rows),
    }


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}; see {log}")
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "sft_longqa")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sft_longqa.json")
    parser.add_argument("--lengths", default="1024,2048,4096", help="held-out prompt lengths in tokens")
    parser.add_argument("--stretches", type=int, default=3, help="held-out stretches per length (4 questions each)")
    parser.add_argument("--train-len", type=int, default=1024, help="training sequence length")
    parser.add_argument("--train-conversations", type=int, default=160)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per optimizer step (accumulated)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from _env import environment
    from real_model import real_model_dir

    from data_prep.tokenizer import load_tokenizer

    started = time.perf_counter()
    seconds = {}
    model_dir = real_model_dir()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = np.random.default_rng(args.seed)

    tokenizer = load_tokenizer(model_dir)
    modules = stdlib_modules(tokenizer, min_tokens=max(lengths) + 1000)
    heldout = modules[::4]
    train_modules = [m for k, m in enumerate(modules) if k % 4]
    conversations = train_conversations(train_modules, args.train_conversations, rng)
    (work / "train.jsonl").write_text("".join(json.dumps({"messages": c["messages"]}) + "\n" for c in conversations))
    overhead = 75  # template, system prompt and question tokens around the code
    questions = {length: heldout_questions(heldout, length, args.stretches, rng, overhead) for length in lengths}
    seconds["data"] = time.perf_counter() - started

    shards = work / "shards"
    prep = [sys.executable, "-m", "longctx.cli", "prep", "sft", "--input", str(work / "train.jsonl")]
    prep += ["--tokenizer", str(model_dir), "--seq-len", str(args.train_len), "--out", str(shards), "--overwrite"]
    prep += ["--seed", str(args.seed), "--quiet"]
    seconds["prep"] = run(prep, work / "prep.log")
    prep_summary = json.loads((shards / "summary.json").read_text())

    t = time.perf_counter()
    before = answer_all(model_dir, questions)
    seconds["eval_before"] = time.perf_counter() - t

    train_settings = [
        f"model.path={model_dir}",
        f"data.train={shards / 'train'}",
        "rope.type=none",  # the model's own context is 8192: nothing to interpolate up to 4096
        "attention.implementation=s2attn",
        f"attention.group_size={args.train_len // 4}",
        "attention.isolate_documents=true",
        "lora.r=8",
        "lora.alpha=16",
        "lora.trainable=[embed, norm]",
        f"train.seq_len={args.train_len}",
        "train.micro_batch_size=1",
        f"train.global_batch_size={args.global_batch}",
        f"train.max_steps={args.steps}",
        f"train.lr={args.lr}",
        "train.warmup_steps=3",
        "train.schedule=constant",
        "train.save_every=0",
        f"train.seed={args.seed}",
        "train.resume=none",
        "model.activation_checkpointing=false",  # 135M parameters at 1024 tokens: memory is no concern
        "deepspeed.config=ds_configs/stage2.json",
    ]
    run_dir = work / "run"
    train = [sys.executable, "-m", "longctx.cli", "train", *train_settings, f"train.output_dir={run_dir}"]
    seconds["train"] = run(train, work / "train.log")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    t = time.perf_counter()
    after = answer_all(run_dir / "final", questions)
    seconds["eval_after"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    results = {
        str(length): {
            "before": accuracy(before[length]),
            "after": accuracy(after[length]),
            "always_None": sum(r["answer"] == "None" for r in before[length]) / len(before[length]),
        }
        for length in lengths
    }
    report = {
        "benchmark": "sft_longqa",
        "task": __doc__.split("\n\n")[1],
        "model": str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO) else str(model_dir),
        "seed": args.seed,
        "modules": {"train": [m[0] for m in train_modules], "heldout": [m[0] for m in heldout]},
        "train_data": {
            "conversations": len(conversations),
            "questions": len(conversations) * QUESTIONS_PER_TRAIN_CONVERSATION,
            "prep_sft": {k: prep_summary[k] for k in ("records", "assistant_turns_trained", "splits")},
        },
        "train_settings": train_settings[2:],
        "train_steps": [{k: s[k] for k in ("step", "loss", "tokens_per_s", "supervised_tokens_per_s")} for s in steps],
        "sequences_trained": args.global_batch * args.steps,
        "results": results,
        "answers": {
            str(length): [
                {**b, "response_after": a["response"], "exact_after": a["exact"], "contained_after": a["contained"]}
                for b, a in zip(before[length], after[length])
            ]
            for length in lengths
        },
        "seconds": seconds,
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    header = ("length", "n", "exact before", "exact after", "contained before", "after", "None")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (7, 3, 13, 12, 17, 6, 5))))
    for length, r in results.items():
        b, a = r["before"], r["after"]
        print(
            f"{length:>7} {b['questions']:>3} {b['exact']:>13.2f} {a['exact']:>12.2f} {b['contained']:>17.2f} "
            f"{a['contained']:>6.2f} {r['always_None']:>5.2f}"
        )
    print(f"seconds: {json.dumps({k: round(v) for k, v in seconds.items()})}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
