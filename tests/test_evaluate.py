"""Evaluation: sliding-window perplexity against a direct token-by-token computation, passkey prompts and scoring,
position-reach checks, plots. Tiny random-init models built from a config; no weights are downloaded."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from longctx.errors import UserError
from longctx.evaluate import (
    PASSKEY_FILLER,
    PASSKEY_TASK,
    check_context_reach,
    extract_passkey,
    greedy_generator,
    passkey_accuracy,
    passkey_prompt,
    perplexity,
    plot_passkey,
    plot_perplexity,
    sliding_windows,
    write_json,
)

VOCAB = 259  # ByteTokenizer: 256 bytes + pad, bos, eos


def tiny_llama(max_position_embeddings=512, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


class ByteTokenizer:
    """Bytes shifted by 3 (0 pad, 1 BOS, 2 EOS): exact, reversible, and enough to test prompt layout."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# ------------------------------------------------------------------------------------------------------------------
# Sliding windows
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [17, 33, 40, 100])
@pytest.mark.parametrize("context_length,stride", [(16, 16), (16, 4), (16, 1), (16, 5), (8, 7)])
def test_windows_score_every_token_once_with_enough_context(num_tokens, context_length, stride):
    times_scored = [0] * num_tokens
    for start, num_scored in sliding_windows(num_tokens, context_length, stride):
        assert 0 <= start and start + context_length + 1 <= num_tokens  # the window and its last target exist
        assert num_scored <= (context_length if start == 0 else stride)
        for target in range(start + context_length + 1 - num_scored, start + context_length + 1):
            times_scored[target] += 1
            if start > 0:
                assert target - start >= context_length - stride + 1  # tokens of context before the target
    assert times_scored == [0] + [1] * (num_tokens - 1)


def test_stream_shorter_than_length_is_refused():
    with pytest.raises(UserError, match="too short for context length 16.*evaluate shorter lengths"):
        sliding_windows(16, 16, 16)  # 16 tokens give only 15 targets: a window of 16 needs 17 tokens


# ------------------------------------------------------------------------------------------------------------------
# Perplexity against a direct computation
# ------------------------------------------------------------------------------------------------------------------


def direct_nll(model, stream, context_start, target):
    """NLL of stream[target] from the model fed stream[context_start:target] alone."""
    with torch.no_grad():
        logits = model(input_ids=stream[None, context_start:target]).logits[0, -1]
    return F.cross_entropy(logits.float(), stream[target]).item()


def rule_context_start(num_tokens, context_length, stride, target):
    """The docstring's rule, restated token by token: window k ends at min(L + kS, T - 1) and starts L before."""
    end = context_length
    while target > end:
        end = min(end + stride, num_tokens - 1)
    return end - context_length


@pytest.mark.parametrize("stride", [4, 16])
def test_perplexity_equals_token_by_token_computation(model, stride):
    context_length = 16
    stream = torch.randint(3, VOCAB, (43,), generator=torch.Generator().manual_seed(1))
    expected = [
        direct_nll(model, stream, rule_context_start(len(stream), context_length, stride, t), t)
        for t in range(1, len(stream))
    ]
    result = perplexity(model, [stream], [context_length], stride=stride, batch_size=3)[context_length]
    assert result["num_tokens"] == len(stream) - 1
    assert result["mean_nll"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-5)


def test_loss_in_slices_equals_loss_at_once(model, monkeypatch):
    stream = torch.randint(3, VOCAB, (50,), generator=torch.Generator().manual_seed(4))
    at_once = perplexity(model, [stream], [16], stride=8, batch_size=2)[16]["mean_nll"]
    monkeypatch.setattr("longctx.evaluate.LOSS_SLICE_TOKENS", 3)
    assert perplexity(model, [stream], [16], stride=8, batch_size=2)[16]["mean_nll"] == pytest.approx(at_once, rel=1e-6)


def test_stride_one_gives_every_token_the_full_context(model):
    """S = 1 needs no rule to state: each token is predicted from its min(t, L) preceding tokens."""
    context_length = 8
    stream = torch.randint(3, VOCAB, (30,), generator=torch.Generator().manual_seed(2))
    expected = [direct_nll(model, stream, max(0, t - context_length), t) for t in range(1, len(stream))]
    result = perplexity(model, [stream], [context_length], stride=1, batch_size=4)[context_length]
    assert result["mean_nll"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_several_lengths_and_streams(model):
    streams = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 25)]
    results = perplexity(model, streams, [8, 24], batch_size=2)
    assert set(results) == {8, 24}
    assert all(r["num_tokens"] == 39 + 24 for r in results.values())
    # The same tokens are scored at every length, only with different contexts: the NLLs differ.
    assert results[8]["mean_nll"] != pytest.approx(results[24]["mean_nll"], rel=1e-9)
    with pytest.raises(UserError, match="too short for context length 32"):
        perplexity(model, streams, [32])  # the second stream has only 25 tokens


def test_bad_stride_is_refused(model):
    stream = torch.randint(3, VOCAB, (40,))
    with pytest.raises(UserError, match="stride 17 must be between 1 and the shortest context length 16"):
        perplexity(model, [stream], [16, 32], stride=17)


# ------------------------------------------------------------------------------------------------------------------
# Position reach
# ------------------------------------------------------------------------------------------------------------------


def test_rope_model_past_its_context_warns_but_runs(capsys):
    model = tiny_llama(max_position_embeddings=16)
    check_context_reach(model.config, [8, 32], "base")
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and "base: context length 32 exceeds the 16 positions" in warning
    check_context_reach(model.config, [8, 16], "base")
    assert capsys.readouterr().err == ""


def test_learned_positions_cannot_reach_past_their_table():
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=1, eos_token_id=2
    )
    gpt2 = AutoModelForCausalLM.from_config(config)
    check_context_reach(gpt2.config, [16], "gpt2")
    with pytest.raises(UserError, match="learned position embeddings for 16 positions.*evaluate lengths <= 16"):
        check_context_reach(gpt2.config, [8, 32], "gpt2")


# ------------------------------------------------------------------------------------------------------------------
# Passkey
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("context_length", [400, 1000])
def test_passkey_prompt_is_one_text_of_the_length_with_the_key_at_the_depth(depth, context_length):
    tokenizer = ByteTokenizer()
    prompt = passkey_prompt(tokenizer, context_length, depth, "48213")
    sentence = len(PASSKEY_FILLER) + 1  # one filler sentence and its space, in bytes = tokens here
    assert context_length - sentence < len(prompt.token_ids) <= context_length
    assert prompt.token_ids[0] == ByteTokenizer.bos_id and tokenizer.decode(prompt.token_ids) == prompt.text
    text = prompt.text
    key_line = "The pass key is 48213. Remember it. 48213 is the pass key."
    assert text.count("48213") == 2 and text.endswith("What is the pass key? The pass key is")
    key_at = prompt.key_position
    # The key line's first token carries the space before it (as "▁The" / "ĠThe" would): one byte more here.
    assert tokenizer.decode(prompt.token_ids[key_at : key_at + 1 + len(key_line)]) == " " + key_line
    # Depth is measured in filler sentences between the task and the question, to within one sentence.
    num_filler = text.count(PASSKEY_FILLER)
    num_before = text[: text.index(key_line)].count(PASSKEY_FILLER)
    assert abs(num_before / num_filler - depth) <= 1 / num_filler


def test_passkey_prompt_keeps_its_spaces_under_byte_level_bpe():
    # GPT-2-style byte-level BPE (SmolLM2, Llama-3, Qwen) marks a leading space inside the token ("ĠThe"): pieces
    # encoded apart and concatenated lost those spaces ("...back again.The pass key is ...").
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = " ".join([PASSKEY_TASK, PASSKEY_FILLER, "The pass key is 12345. Remember it.", "What is the pass key?"])
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte has a token, as in GPT-2's vocabulary
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator([text] * 20, trainer)

    class ByteLevelTokenizer:
        bos_id = None

        def encode(self, text):
            return tokenizer.encode(text).ids

        def decode(self, ids):
            return tokenizer.decode(ids)

    prompt = passkey_prompt(ByteLevelTokenizer(), 300, 0.5, "48213")
    decoded = ByteLevelTokenizer().decode(prompt.token_ids)
    assert decoded == prompt.text and "again. The pass key is 48213. Remember it. 48213 is the pass key. The" in decoded
    assert decoded.endswith("again. What is the pass key? The pass key is")


def test_passkey_prompt_too_short_is_refused():
    with pytest.raises(UserError, match="passkey length 100 is too short for the prompt: use lengths >= "):
        passkey_prompt(ByteTokenizer(), 100, 0.5, "12345")


def test_scorer_counts_right_and_wrong_answers():
    tokenizer = ByteTokenizer()

    def oracle(prompt_ids, max_new_tokens):  # reads the key back out of the prompt, as a perfect model would
        key = extract_passkey(tokenizer.decode(prompt_ids).split("The pass key is ")[1])
        return tokenizer.encode(f" {key}. ")[:max_new_tokens]

    def wrong(prompt_ids, max_new_tokens):
        return tokenizer.encode(" 00000.")

    lengths, depths = [400, 600], [0.0, 0.5, 1.0]
    perfect = passkey_accuracy(oracle, tokenizer, lengths, depths, num_trials=3, seed=7)
    assert perfect["accuracy"] == [[1.0] * 3] * 2 and perfect["lengths"] == lengths and perfect["depths"] == depths
    # Every trial is recorded with its answer, for inspection.
    assert len(perfect["answers"]) == 2 * 3 * 3 and all(a["correct"] for a in perfect["answers"])
    first = perfect["answers"][0]
    assert first["length"] == 400 and first["depth"] == 0.0 and first["answer"].strip(" .") == first["key"]
    assert first["prompt_tokens"] <= 400
    assert passkey_accuracy(wrong, tokenizer, lengths, depths, num_trials=3, seed=7)["accuracy"] == [[0.0] * 3] * 2


def test_random_model_fails_passkey(model):
    result = passkey_accuracy(greedy_generator(model), ByteTokenizer(), [400], [0.0, 1.0], num_trials=2, seed=0)
    assert result["accuracy"] == [[0.0, 0.0]]


def test_greedy_generator_matches_full_forward(model):
    """The KV-cached loop must produce what argmax over a full forward at each step produces."""
    prompt = torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    generated = greedy_generator(model)(prompt, 6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if next_id == 2:
                break
            ids.append(next_id)
    assert generated == ids[len(prompt) :]


# ------------------------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------------------------


def test_plots_and_json_are_written_whole(tmp_path):
    # Lengths as int (from `perplexity`) or str (from perplexity.json) both plot.
    plot_perplexity({"base": {256: 12.0, 512: 40.0}, "extended": {"512": 10.5, "256": 11.0}}, tmp_path / "ppl.png")
    passkey = {"lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "trials": 2, "accuracy": [[1, 0.5, 1], [0, 0, 0.5]]}
    plot_passkey(passkey, tmp_path / "passkey.png")
    write_json(passkey, tmp_path / "passkey.json")
    for name in ("ppl.png", "passkey.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "passkey.json").read_text()) == passkey
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passkey.json", "passkey.png", "ppl.png"]  # no temp files
