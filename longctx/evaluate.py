"""Evaluation of a context-extended model: perplexity against context length, passkey retrieval, and their plots.

Evaluation always uses dense causal attention (PyTorch SDPA), whatever the model was trained with, with parameters in
bfloat16 on a GPU (float16 on one without bf16) and float32 on CPU, and RoPE's buffers in float32 as in training.
When torch.distributed is initialised (e.g. under the `deepspeed` launcher) every rank scores a disjoint share of the
work and the sums are all-reduced, so N ranks give the result of one rank; rank 0 prints and writes the outputs.

Perplexity rule (sliding window with stride S, see `perplexity`): every token of a held-out stream except its
first is scored exactly once; tokens past the first window see at least L - S + 1 tokens of context.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.atomic import save_figure_atomic, write_json_atomic
from longctx.distributed import init_distributed
from longctx.distributed import rank_and_world as _rank_and_world
from longctx.errors import UserError
from longctx.model import EVAL_ATTENTION
from longctx.parallel import all_reduce_

# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def parse_model_specs(specs: Sequence[str]) -> dict[str, str]:
    """`NAME=PATH` or `PATH` (named after the directory) → {name: path}, in the order given."""
    return parse_named_dirs(
        specs,
        "--model",
        lambda directory: directory.name,
        "give a Hugging Face model directory or a checkpoint",
        example="--model base=runs/base",
    )


def parse_named_dirs(
    specs: Sequence[str],
    option: str,
    default_name: Callable[[Path], str],
    what_to_give: str,
    *,
    example: str,
) -> dict[str, str]:
    """`NAME=DIR` or `DIR` (named default_name(DIR)) → {name: dir}, in the order given; each DIR must exist.

    option: the command-line option, for the messages; what_to_give: the fix when DIR is not a directory."""
    named: dict[str, str] = {}
    kind = option.lstrip("-")
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = default_name(Path(spec.rstrip("/"))) or spec, spec
        if not name or not path:
            raise UserError(f"{option} {spec!r} is not NAME=DIR or DIR: write e.g. {example}")
        if name in named:
            raise UserError(
                f"{option} name {name!r} is given twice: name each {kind} once ({option} a=DIR1 {option} b=DIR2)"
            )
        if not Path(path).is_dir():
            raise UserError(f"{kind} {path} is not a directory: {what_to_give}")
        named[name] = path
    return named


def eval_device() -> torch.device:
    """This rank's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_model_dir(path: str | os.PathLike) -> tuple[Path, bool]:
    """(directory, is a longctx checkpoint) of a --model path; a training run dir means its newest checkpoint."""
    from longctx import checkpoint

    model_dir = Path(path)
    if not model_dir.is_dir():
        raise UserError(f"model {path} is not a directory: give a Hugging Face model directory or a checkpoint")
    if (model_dir / checkpoint.CHECKPOINTS_DIR).is_dir():
        found = checkpoint.complete_checkpoints(model_dir)
        if not found:
            raise UserError(f"training run {path} has no complete checkpoint yet: train longer or pick another model")
        model_dir = found[-1]
    if (model_dir / "config.yaml").is_file():
        return model_dir, True
    if (model_dir / "config.json").is_file():
        return model_dir, False
    raise UserError(
        f"model {path} has neither config.json (Hugging Face model) nor config.yaml (longctx checkpoint): "
        "point --model at one of those"
    )


def eval_model_config(path: str | os.PathLike):
    """The Hugging Face config the evaluated model will have (RoPE scaling of a run included), without loading
    weights; every file the model will be loaded from is checked here (present, not truncated, the checkpoint's base
    unchanged), so a command that evaluates several models fails before the first one is evaluated."""
    from longctx.tensor_files import check_model_weights

    model_dir, is_checkpoint = resolve_model_dir(path)
    if is_checkpoint:
        from longctx import checkpoint
        from longctx.model import apply_rope_scaling, load_hf_config
        from longctx.tensor_files import check_safetensors_file

        run_config = checkpoint.load_run_config(model_dir)
        hf_config = load_hf_config(run_config)
        apply_rope_scaling(hf_config, run_config)
        trained = sorted(model_dir.glob(f"{checkpoint.TRAINED_PREFIX}*.safetensors"))
        if not trained:
            checkpoint.load_trained(model_dir)  # its error says what the checkpoint lacks
        for file in trained:
            check_safetensors_file(file)
        checkpoint.check_base(model_dir, run_config)
        if run_config.model.path:
            check_model_weights(run_config.model.path)
        return hf_config
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir / 'config.json'} cannot be read ({_first_line(e)}): check the file") from None
    check_model_weights(model_dir)
    return config


def eval_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU with bf16 arithmetic, float16 on one without (V100, T4), float32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def load_eval_model(path: str | os.PathLike, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """A model ready for evaluation: dense SDPA attention, eval mode, parameters in `dtype` (default `eval_dtype`).

    `path` is a plain Hugging Face model directory (config.json; loaded with trust_remote_code off), a longctx
    training checkpoint (checkpoints/step_N; its trained weights put back on its base by
    `longctx.merge.load_trained_model`, directly in the evaluation dtype), or a training output directory (its newest
    complete checkpoint). A 4-bit run (quant.type set) is evaluated as the model `longctx export` writes: its base
    dequantized (the exact weights the 4-bit layers computed with) and LoRA merged, so the numbers are those of the
    shipped model, and they do not depend on bitsandbytes' inference kernels (on CPU these re-pack the codes and
    compute in bf16).

    Only parameters take the evaluation dtype: buffers keep theirs, so RoPE's inv_freq stays fp32 as in training (in
    bf16 its rounding becomes a phase error that grows with the position, exactly where long contexts are scored).
    """
    device = device or eval_device()
    dtype = dtype or eval_dtype(device)
    model_dir, is_checkpoint = resolve_model_dir(path)
    if is_checkpoint:
        from longctx.merge import load_trained_model

        model, _ = load_trained_model(model_dir, dtype=dtype, device=device)
        model.set_attn_implementation(EVAL_ATTENTION)
        return model.eval()
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=EVAL_ATTENTION, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        raise UserError(
            f"model {model_dir} cannot be loaded ({_first_line(e)[:150]}): re-download or re-export its files"
        ) from None
    if not getattr(model, "is_quantized", False):
        cast_parameters(model, dtype)
        model = model.to(device)
    return model.eval()


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point parameters to dtype and leave the buffers as they are (see `load_eval_model`)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_context_reach(config, context_lengths: Iterable[int], name: str = "model") -> None:
    """Refuse lengths beyond learned absolute position embeddings; warn (one line) beyond a RoPE model's context.

    `config` is the model's Hugging Face config. A RoPE model runs at any length (its quality collapses past what
    it was trained for, which is exactly what a base-versus-extended comparison shows), so lengths past
    max_position_embeddings (or the scaled original context of rope_parameters) are evaluated, with a warning.
    A model with learned absolute positions (GPT-2's n_positions, OPT's max_position_embeddings) has no embedding
    for a position past its table: that length is an error.
    """
    longest = max(context_lengths)
    rope = getattr(config, "rope_parameters", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    if rope:
        reach = max_positions or 0
        if rope.get("factor") and rope.get("original_max_position_embeddings"):
            reach = max(reach, int(rope["original_max_position_embeddings"] * rope["factor"]))
        if reach and longest > reach and _rank_and_world()[0] == 0:
            print(
                f"longctx: warning: {name}: context length {longest} exceeds the {reach} positions it was trained "
                "for; evaluating anyway (expect perplexity to rise)",
                file=sys.stderr,
            )
    elif max_positions and longest > max_positions:
        raise UserError(
            f"{name} has learned position embeddings for {max_positions} positions and cannot reach context length "
            f"{longest}: evaluate lengths <= {max_positions}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers: every rank takes a disjoint share of the work; sums are all-reduced
# ----------------------------------------------------------------------------------------------------------------


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _rank_and_world()[1] > 1:
        all_reduce_(tensor, op=dist.ReduceOp.SUM)
    return tensor


def init_distributed_from_env() -> None:
    """Join the process group of a launcher (deepspeed, torchrun); a single process evaluates without one."""
    init_distributed(single_process_group=False)


# ----------------------------------------------------------------------------------------------------------------
# Perplexity against context length
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens [start, start + L) of a stream predict [start + 1, start + L]; the last
    `num_scored` of those predictions are scored."""

    stream: int
    start: int
    num_scored: int


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int]]:
    """(start, num_scored) of every window over a stream of `num_tokens` tokens; see `perplexity` for the rule."""
    if num_tokens < context_length + 1:
        raise UserError(
            f"a held-out stream of {num_tokens} tokens is too short for context length {context_length} "
            f"(it needs {context_length + 1}): evaluate shorter lengths or hold out more data"
        )
    windows = [(0, context_length)]
    end = context_length  # input tokens [0, end) have been read; targets 1..end are scored
    last_target = num_tokens - 1
    while end < last_target:
        new_end = min(end + stride, last_target)
        windows.append((new_end - context_length, new_end - end))
        end = new_end
    return windows


def perplexity(
    model,
    streams: Iterable[torch.Tensor],
    context_lengths: Sequence[int],
    *,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Perplexity of `model` on held-out token streams at each context length L, with a sliding window.

    The rule: a window is L consecutive tokens of a stream fed to the model at positions 0..L-1; the logits at each
    position predict the next token, so the window [s, s + L) predicts tokens s + 1..s + L. The first window of a
    stream (tokens 0..L-1) scores all its L predictions.
    Each further window ends S tokens (the stride; default L) after the previous one, the last one ending at the
    stream's end, and scores only the predictions not scored yet (at most S). So every token of a stream but its
    first is scored exactly once, and every token after the first window is predicted from at least L - S + 1
    tokens of context (S = L: non-overlapping windows; S = L/4: at least 3L/4 + 1). Each stream must hold at least
    L + 1 tokens. Perplexity = exp(sum of negative log-likelihoods / number of scored tokens), over all streams.

    Windows are batched `batch_size` at a time; under torch.distributed each rank scores every world_size-th window
    and the sums are all-reduced, so the result does not depend on the number of ranks.
    Returns {L: {"perplexity", "mean_nll", "num_tokens"}}.
    """
    from tqdm.auto import tqdm

    streams = [torch.as_tensor(s, dtype=torch.long).flatten() for s in streams]
    if not streams:
        raise UserError("no held-out tokens to evaluate: give a non-empty validation shard directory")
    if min(context_lengths) < 1:
        raise UserError(f"context lengths {list(context_lengths)} must all be >= 1")
    if stride is not None and not 1 <= stride <= min(context_lengths):
        raise UserError(
            f"stride {stride} must be between 1 and the shortest context length {min(context_lengths)}: "
            "a larger stride would skip tokens"
        )
    rank, world_size = _rank_and_world()
    device = next(model.parameters()).device
    results = {}
    for context_length in context_lengths:
        windows = [
            Window(i, start, num_scored)
            for i, stream in enumerate(streams)
            for start, num_scored in sliding_windows(len(stream), context_length, stride or context_length)
        ]
        my_windows = windows[rank::world_size]
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of NLL, number of scored tokens)
        batches = range(0, len(my_windows), batch_size)
        for first in tqdm(batches, desc=f"ppl L={context_length}", disable=not progress or rank != 0, leave=False):
            batch = my_windows[first : first + batch_size]
            sums += _score_windows(model, streams, batch, context_length, device)
        _all_reduce_sum(sums)
        nll_sum, num_tokens = sums.tolist()  # host sync: once per context length
        assert num_tokens == sum(len(s) - 1 for s in streams), "sliding windows must score every token once"
        results[context_length] = {
            "perplexity": math.exp(nll_sum / num_tokens),
            "mean_nll": nll_sum / num_tokens,
            "num_tokens": int(num_tokens),
        }
    return results


LOSS_SLICE_TOKENS = 4096  # positions whose logits are upcast to float32 at once


@torch.inference_mode()
def _score_windows(model, streams, batch: list[Window], context_length: int, device) -> torch.Tensor:
    """(sum of NLL, count) of the scored predictions of a batch of equally long windows."""
    # (B, L + 1): the window's L input tokens followed by the token its last position predicts
    tokens = torch.stack([streams[w.stream][w.start : w.start + context_length + 1] for w in batch]).to(device)
    num_kept = max(w.num_scored for w in batch)
    # Only the last num_kept positions' logits are needed: logits_to_keep skips the rest of the (B, L, vocab) head.
    logits = model(input_ids=tokens[:, :-1], logits_to_keep=num_kept).logits  # (B, num_kept, vocab)
    targets = tokens[:, -num_kept:]  # (B, num_kept)
    # float32 log-softmax a slice of positions at a time: a whole 32k-token window in fp32 would take ~4 GB more.
    step = LOSS_SLICE_TOKENS
    nll = torch.cat(
        [
            F.cross_entropy(logits[:, i : i + step].float().transpose(1, 2), targets[:, i : i + step], reduction="none")
            for i in range(0, num_kept, step)
        ],
        dim=1,
    )  # (B, num_kept)
    # A window scores only its last num_scored predictions (the others were scored by an earlier window).
    offsets = torch.arange(num_kept, device=device)
    scored = offsets[None, :] >= torch.tensor([num_kept - w.num_scored for w in batch], device=device)[:, None]
    return torch.stack([(nll * scored).sum(dtype=torch.float64), scored.sum().to(torch.float64)])


def load_heldout_stream(shard_dir: str | os.PathLike, max_tokens: int = 0) -> torch.Tensor:
    """The held-out split as ONE token stream: its packed sequences concatenated in order, tail padding dropped.

    Packing cuts one stream of documents (separated by their BOS/EOS tokens) into fixed-length sequences, so
    concatenating the sequences in order restores that stream, and any context length up to the split's size can be
    evaluated, whatever seq_len the shards were packed with. `max_tokens` > 0 keeps only the first max_tokens.
    """
    from longctx.shards import open_shards

    shards = open_shards(shard_dir)
    pieces, num_tokens = [], 0
    for index in range(len(shards)):
        pieces.append(torch.from_numpy(shards[index][: shards.num_valid(index)].astype("int64")))
        num_tokens += len(pieces[-1])
        if max_tokens and num_tokens >= max_tokens:
            break
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return stream[:max_tokens] if max_tokens else stream


# ----------------------------------------------------------------------------------------------------------------
# Passkey retrieval (LongLoRA / landmark attention)
# ----------------------------------------------------------------------------------------------------------------

PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_DIGITS = 5


def passkey_line(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


@dataclass
class PasskeyPrompt:
    token_ids: list[int]
    """At most the asked number of tokens: the document start token (if any), then ONE text encoded once."""
    passkey: str
    key_position: int
    """Index in token_ids of the key line's first token (which carries the space before it, as "▁The" would)."""
    text: str
    """The text that was encoded."""


def passkey_text(num_filler: int, num_before: int, passkey: str) -> str:
    """Task, `num_before` filler sentences, the key line, the other filler sentences, the question; one space
    between sentences, as a person would write it (separately encoded pieces lose those spaces under byte-level BPE)."""
    filler = [PASSKEY_FILLER] * num_filler
    return " ".join([PASSKEY_TASK, *filler[:num_before], passkey_line(passkey), *filler[num_before:], PASSKEY_QUESTION])


def passkey_prompt(tokenizer, context_length: int, depth: float, passkey: str) -> PasskeyPrompt:
    """The longest prompt of at most `context_length` tokens, with the key line after `depth` of the filler sentences
    (0: right after the task, 1: right before the question).

    The prompt is one text encoded once, so every tokenizer sees it as it would see real text; its length is then
    within one filler sentence (~25 tokens) of `context_length`, found by bisection over the number of sentences.
    """
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"passkey depth {depth} is outside [0, 1]: 0 is the start of the text, 1 its end")
    start = _prompt_start(tokenizer)

    def encoded(num_filler: int) -> tuple[list[int], str, int]:
        num_before = round(depth * num_filler)
        text = passkey_text(num_filler, num_before, passkey)
        return start + tokenizer.encode(text), text, num_before

    if len(encoded(1)[0]) > context_length:
        shortest = len(encoded(1)[0])
        raise UserError(f"passkey length {context_length} is too short for the prompt: use lengths >= {shortest}")
    low, high = 1, max(2, context_length)  # every filler sentence is at least one token
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if len(encoded(middle)[0]) <= context_length else (low, middle)
    token_ids, text, num_before = encoded(low)
    before_key = text[: text.index(passkey_line(passkey))].rstrip(" ")
    key_position = len(start + tokenizer.encode(before_key))
    return PasskeyPrompt(token_ids, passkey, key_position, text)


def _prompt_start(tokenizer) -> list[int]:
    """What a document of the training data starts with: the tokenizer's document-start token (its BOS, unless that is
    an instruct model's chat-turn marker), or nothing."""
    delimiters = getattr(tokenizer, "document_delimiters", None)
    start = delimiters()[0] if delimiters is not None else tokenizer.bos_id
    return [start] if start is not None and start >= 0 else []


def greedy_generator(model) -> Callable[[list[int], int], list[int]]:
    """generate(prompt_ids, max_new_tokens) → new token ids, by greedy decoding with the model's KV cache."""
    import inspect

    device = next(model.parameters()).device
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    # transformers renamed the KV cache argument and output field (past_key_values -> cache, the old one deprecated)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        input_ids = torch.tensor([prompt_ids], device=device)
        output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        new_ids: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(output.logits[0, -1].argmax())  # host sync: one per generated token
            if next_id in eos_ids:
                break
            new_ids.append(next_id)
            next_input = torch.tensor([[next_id]], device=device)
            output = model(input_ids=next_input, use_cache=True, **{cache_name: getattr(output, cache_name)})
        return new_ids

    return generate


def extract_passkey(text: str) -> str:
    """The first number in a generated answer ('' when there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def passkey_accuracy(
    generate: Callable[[list[int], int], list[int]],
    tokenizer,
    context_lengths: Sequence[int],
    depths: Sequence[float],
    *,
    num_trials: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Exact-match accuracy of passkey retrieval per (context length, depth), over `num_trials` random keys each.

    Keys are random 5-digit numbers from `seed` (the same keys for every model). The answer is greedily decoded
    and its first number must equal the key. Under torch.distributed the trials are spread over the ranks and the
    results gathered. Returns {"lengths", "depths", "trials", "accuracy": [[acc per depth] per length], "answers":
    one {length, depth, key, prompt_tokens, answer, correct} per trial}.
    """
    from tqdm.auto import tqdm

    if num_trials < 1:
        raise UserError(f"trials {num_trials} must be >= 1")
    rng = random.Random(seed)
    tasks = [
        (i, j, str(rng.randrange(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS)))
        for i in range(len(context_lengths))
        for j in range(len(depths))
        for _ in range(num_trials)
    ]
    for length in context_lengths:  # a length too short for the prompt fails now, not after hours of generation
        passkey_prompt(tokenizer, length, 0.0, "0" * PASSKEY_DIGITS)
    max_new_tokens = len(tokenizer.encode(" " + "9" * PASSKEY_DIGITS + ".")) + 2
    rank, world_size = _rank_and_world()
    answers: list[dict[str, Any] | None] = [None] * len(tasks)
    for index in tqdm(range(rank, len(tasks), world_size), desc="passkey", disable=not progress or rank != 0):
        i, j, key = tasks[index]
        prompt = passkey_prompt(tokenizer, context_lengths[i], depths[j], key)
        answer = tokenizer.decode(generate(prompt.token_ids, max_new_tokens))
        answers[index] = {
            "length": context_lengths[i],
            "depth": depths[j],
            "key": key,
            "prompt_tokens": len(prompt.token_ids),
            "answer": answer,
            "correct": extract_passkey(answer) == key,
        }
    correct = torch.zeros(len(context_lengths), len(depths), dtype=torch.float64)
    for (i, j, _), answer in zip(tasks, answers):
        correct[i, j] += answer is not None and answer["correct"]
    if world_size > 1:
        # Each rank answered every world_size-th trial: gather the answers (small Python objects), then sum the
        # counts with the all-reduce that waits for gloo to release its buffer (the last collective of the run).
        gathered: list[list[dict[str, Any] | None]] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, answers)
        answers = [next(a[index] for a in gathered if a[index] is not None) for index in range(len(tasks))]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        correct = _all_reduce_sum(correct.to(device)).cpu()
    return {
        "lengths": list(context_lengths),
        "depths": list(depths),
        "trials": num_trials,
        "accuracy": (correct / num_trials).tolist(),
        "answers": answers,
    }


# ----------------------------------------------------------------------------------------------------------------
# Outputs: table, JSON, plots (all files written atomically)
# ----------------------------------------------------------------------------------------------------------------


def write_json(obj: Any, path: str | os.PathLike) -> None:
    write_json_atomic(path, obj, indent=2, sort_keys=False)


def _save_figure(fig, path: Path) -> None:
    save_figure_atomic(fig, path, dpi=120, bbox_inches="tight")


def plot_perplexity(results: dict[str, dict[int, float]], path: str | os.PathLike, title: str = "") -> None:
    """PNG of perplexity against context length, one line per model: results = {model name: {L: perplexity}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, by_length in results.items():
        points = sorted((int(length), ppl) for length, ppl in by_length.items())  # keys are str when read from JSON
        ax.plot([length for length, _ in points], [ppl for _, ppl in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    all_lengths = sorted({int(length) for by_length in results.values() for length in by_length})
    ax.set_xticks(all_lengths, [str(length) for length in all_lengths])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "Perplexity against context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save_figure(fig, Path(path))
    plt.close(fig)


def plot_passkey(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> None:
    """Heat map of passkey accuracy: depth (rows) against context length (columns), from `passkey_accuracy`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = torch.tensor(result["accuracy"]).T  # (depths, lengths)
    fig, ax = plt.subplots(figsize=(1.2 * len(result["lengths"]) + 2.5, 0.6 * len(result["depths"]) + 1.8))
    image = ax.imshow(accuracy.numpy(), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(length) for length in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{depth:g}" for depth in result["depths"]])
    for row in range(accuracy.shape[0]):
        for col in range(accuracy.shape[1]):
            ax.text(col, row, f"{accuracy[row, col]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key")
    ax.set_title(title or f"Passkey retrieval ({result['trials']} trials per cell)")
    fig.colorbar(image, ax=ax, label="accuracy")
    _save_figure(fig, Path(path))
    plt.close(fig)


def format_perplexity_table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    """Models as rows, context lengths as columns."""
    lengths = sorted({length for by_length in results.values() for length in by_length})
    name_width = max(len("model"), *(len(name) for name in results))
    lines = ["model".ljust(name_width) + "".join(f"{length:>12}" for length in lengths)]
    for name, by_length in results.items():
        cells = "".join(f"{by_length[length]['perplexity']:>12.3f}" for length in lengths)
        lines.append(name.ljust(name_width) + cells)
    return "\n".join(lines)


def format_passkey_table(name: str, result: dict[str, Any]) -> str:
    """Depths as rows, context lengths as columns."""
    lines = [f"{name}: passkey accuracy (depth \\ length)", "depth" + "".join(f"{n:>10}" for n in result["lengths"])]
    for j, depth in enumerate(result["depths"]):
        lines.append(f"{depth:<5g}" + "".join(f"{row[j]:>10.2f}" for row in result["accuracy"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Commands (called by `longctx eval ppl` / `longctx eval passkey`)
# ----------------------------------------------------------------------------------------------------------------


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r} must be comma-separated whole numbers, e.g. 256,512,1024") from None
    if not values or min(values) < 1:
        raise UserError(f"{what} {text!r} must list positive numbers, e.g. 256,512,1024")
    return sorted(set(values))


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r} must be comma-separated numbers, e.g. 0,0.25,0.5,0.75,1") from None
    if not values:
        raise UserError(f"{what} is empty: give e.g. 0,0.25,0.5,0.75,1")
    return values


def check_out_dir(out: str | os.PathLike) -> Path:
    """--out as a directory to write results into, checked but not created (it is made only once there are results,
    so a failed evaluation leaves no empty directory behind)."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out} is a file: give a directory for the results")
    parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise UserError(f"--out {out} cannot be created: {parent} is not writable; give another --out")
    return out_dir


def run_ppl(args) -> int:
    """`longctx eval ppl`."""
    evaluate_perplexity(
        parse_model_specs(args.model),
        args.data,
        parse_int_list(args.lengths, "--lengths"),
        args.out,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        device_map=args.device_map,
    )
    return 0


def run_passkey(args) -> int:
    """`longctx eval passkey`."""
    models = parse_model_specs(args.model)
    evaluate_passkey(
        models,
        args.tokenizer or _tokenizer_beside(next(iter(models.values()))),
        parse_int_list(args.lengths, "--lengths"),
        parse_float_list(args.depths, "--depths"),
        args.out,
        num_trials=args.trials,
        seed=args.seed,
    )
    return 0


def evaluate_perplexity(
    models: dict[str, str],
    data_dir: str | os.PathLike,
    lengths: list[int],
    out_dir: str | os.PathLike,
    *,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int = 0,
    device_map: str = "none",
) -> dict[str, Any]:
    """Perplexity of each model ({name: model dir or checkpoint}) at each length on held-out shards.

    Rank 0 prints a table and writes perplexity.json (returned) and perplexity.png to out_dir. Every model's
    positions and vocabulary are checked before the first one is evaluated. device_map: see longctx.placement.
    """
    from longctx.placement import check_device_map, load_for_eval

    if stride is not None and not 1 <= stride <= min(lengths):
        raise UserError(f"stride {stride} must be between 1 and the shortest length {min(lengths)}")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be >= 1")
    if max_tokens < 0:
        raise UserError(f"max tokens {max_tokens} must be >= 0 (0: every held-out token)")
    if not Path(data_dir).is_dir():
        raise UserError(f"data {data_dir} is not a directory: give held-out shards, e.g. <prep out>/val")
    out_dir = check_out_dir(out_dir)
    check_device_map(models, device_map)
    init_distributed_from_env()
    rank, _ = _rank_and_world()
    stream = load_heldout_stream(data_dir, max_tokens)
    if len(stream) < max(lengths) + 1:
        raise UserError(
            f"the held-out data in {data_dir} has {len(stream)} tokens, fewer than the longest length "
            f"{max(lengths)} + 1: evaluate shorter lengths or hold out more data (prep.val_fraction)"
        )
    for name, path in models.items():
        config = eval_model_config(path)
        check_context_reach(config, lengths, name)
        if int(stream.max()) >= config.vocab_size:
            raise UserError(
                f"held-out tokens in {data_dir} reach id {int(stream.max())} but {name} has "
                f"{config.vocab_size} token embeddings: evaluate on shards packed with the model's tokenizer"
            )
    results = {}
    for name, path in models.items():
        model = load_for_eval(path, device_map)
        results[name] = perplexity(model, [stream], lengths, stride=stride, batch_size=batch_size, progress=True)
        del model
    report = {
        "data": str(data_dir),
        "num_stream_tokens": len(stream),
        "stride": {length: stride or length for length in lengths},
        "lengths": lengths,
        "models": {name: {"path": str(models[name]), "results": results[name]} for name in models},
    }
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(report, out_dir / "perplexity.json")
        plot_perplexity(
            {name: {length: r["perplexity"] for length, r in by_length.items()} for name, by_length in results.items()},
            out_dir / "perplexity.png",
        )
        print(format_perplexity_table(results))
        print(f"scored {len(stream) - 1} tokens per length; wrote {out_dir / 'perplexity.json'}, perplexity.png")
    return report


def _tokenizer_beside(model_dir: str) -> Path:
    """The tokenizer saved in a Hugging Face model directory, for when --tokenizer is not given."""
    path = Path(model_dir)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise UserError(
            f"model {model_dir} holds no tokenizer: give --tokenizer (the .model file or directory prep used)"
        )
    return path


def evaluate_passkey(
    models: dict[str, str],
    tokenizer_path: str | os.PathLike,
    lengths: list[int],
    depths: list[float],
    out_dir: str | os.PathLike,
    *,
    num_trials: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Passkey accuracy of each model ({name: model dir or checkpoint}) per length and depth.

    Rank 0 prints a table per model and writes passkey.json (returned) and passkey_<name>.png to out_dir.
    """
    if any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"depths {depths} must lie in [0, 1]: 0 is the start of the text, 1 its end")
    if num_trials < 1:
        raise UserError(f"trials {num_trials} must be >= 1")
    from data_prep.tokenizer import load_tokenizer

    out_dir = check_out_dir(out_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    init_distributed_from_env()
    rank, _ = _rank_and_world()
    for name, path in models.items():
        config = eval_model_config(path)
        check_context_reach(config, lengths, name)
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but {name} has {config.vocab_size} token "
                "embeddings: give the model's own tokenizer with --tokenizer"
            )
    results = {}
    for name, path in models.items():
        model = load_eval_model(path)
        generate = greedy_generator(model)
        results[name] = passkey_accuracy(
            generate, tokenizer, lengths, depths, num_trials=num_trials, seed=seed, progress=True
        )
        del model, generate
    report = {"seed": seed, "models": {name: {"path": str(models[name]), **r} for name, r in results.items()}}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(report, out_dir / "passkey.json")
        for name, result in results.items():
            plot_passkey(result, out_dir / f"passkey_{name}.png", title=f"{name}: passkey retrieval")
            print(format_passkey_table(name, result))
        print(f"wrote {out_dir / 'passkey.json'} and a heat map per model")
    return report
