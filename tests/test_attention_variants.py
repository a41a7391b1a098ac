"""S²-Attn's variants (docs/s2attn.md, "Variants that reach further"): sinks, dense heads, a dense phase.

Each is checked against a float64 masked reference written from the definition, forward and backward, with GQA,
odd head counts, packed documents, arbitrary segments and head slices; causality by gradients; and through the
config, the registered attention function and a training run.
"""

import itertools

import pytest
import torch
from test_attention import packed_positions, random_qkv

from longctx import attention
from longctx.attention import dense_attention, s2_attention, segment_ids_from_position_ids
from longctx.errors import UserError
from longctx.parallel import num_dense_heads, num_unshifted_heads


def variant_reference(q, k, v, group_size, *, position_ids=None, segment_ids=None, sink_tokens=0, dense_heads=0):
    """Float64 masked attention from the definition; returns (B, H, N, D) float64.

    Of H heads, the last dense_heads are dense; of the others, heads below floor(H/2) are unshifted, the rest
    shifted by G/2. In grouped heads token i may attend to j iff j <= i, same segment, and (same group, or j is one
    of the first sink_tokens tokens of the segment and comes before every token of i's group in the segment).
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, num_heads, seq_len, head_dim = q.shape
    kv_of_head = torch.arange(num_heads) // (num_heads // k.shape[1])
    k, v = k[:, kv_of_head], v[:, kv_of_head]
    t = torch.arange(seq_len).expand(batch, seq_len) if position_ids is None else position_ids.expand(batch, seq_len)
    seg = torch.zeros(batch, seq_len, dtype=torch.long) if segment_ids is None else segment_ids.expand(batch, seq_len)
    index = torch.arange(seq_len)
    causal = index[:, None] >= index[None, :]
    same_segment = (seg[:, :, None] == seg[:, None, :])[:, None]  # (B, 1, N, N)
    heads = torch.arange(num_heads)
    dense = heads >= num_heads - dense_heads
    shifted = (heads >= num_heads // 2) & ~dense
    offset = torch.where(shifted, group_size // 2, 0)
    group = torch.div(t[:, None, :] + offset[None, :, None], group_size, rounding_mode="floor")  # (B, H, N)
    same_group = group[..., :, None] == group[..., None, :]  # (B, H, N, N)
    # rank of each token in its segment (by index) and the first index of each token's (segment, group)
    rank = ((seg[:, None, :] == seg[:, :, None]) & (index[None, None, :] < index[None, :, None])).sum(-1)  # (B, N)
    members = same_group & same_segment
    first_of_group = torch.where(members, index, seq_len).amin(-1)  # (B, H, N)
    sink = (rank < sink_tokens)[:, None, None, :] & (index[None, None, None, :] < first_of_group[..., :, None])
    allowed = causal & same_segment & (same_group | sink | dense[None, :, None, None])
    scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def arguments(kind, seq_len, seed=0):
    """s2_attention's keyword arguments for 2 rows: plain positions, packed documents (positions restarting, not
    isolated), isolated packed documents, or arbitrary segment labels (segments that interleave)."""
    positions = packed_positions([[5, seq_len - 5], [seq_len]])
    if kind == "plain":
        return {}
    if kind == "packed":
        return {"position_ids": positions}
    if kind == "isolated":
        return {"position_ids": positions, "segment_ids": segment_ids_from_position_ids(positions)}
    generator = torch.Generator().manual_seed(seed)
    return {"segment_ids": torch.randint(0, 3, (2, seq_len), generator=generator)}


# (H, Hkv, N, G): MHA, GQA, MQA, odd H (SmolLM2's 9/3, 15/5, 7/1), one head, N not a multiple of G
SHAPES = [(4, 4, 32, 8), (8, 2, 37, 8), (9, 3, 37, 8), (6, 2, 40, 8), (1, 1, 19, 4), (7, 1, 33, 8), (15, 5, 29, 6)]
KINDS = ["plain", "packed", "isolated", "segments"]


@pytest.mark.parametrize("num_heads,num_kv_heads,seq_len,group_size", SHAPES)
def test_forward_matches_the_definition(num_heads, num_kv_heads, seq_len, group_size):
    q, k, v = random_qkv(2, num_heads, num_kv_heads, seq_len)
    for sinks, dense, kind in itertools.product([0, 1, 3], sorted({0, 1, 2, num_heads}), KINDS):
        if sinks > group_size // 2 or dense > num_heads:
            continue
        kwargs = arguments(kind, seq_len)
        got = s2_attention(q, k, v, group_size, sink_tokens=sinks, num_dense_heads=dense, **kwargs)
        expected = variant_reference(q, k, v, group_size, sink_tokens=sinks, dense_heads=dense, **kwargs)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5, msg=f"{sinks=} {dense=} {kind=}")


def test_the_reference_is_plain_s2attn_without_variants_and_dense_with_all_heads():
    """The reference itself: no variant is the plain definition (tests/test_attention.py), all heads dense is dense
    causal attention, and sinks change what a late token sees (a reference that ignored them would fail here)."""
    from test_attention import reference_attention

    q, k, v = random_qkv(2, 9, 3, 37)
    kwargs = arguments("isolated", 37)
    plain = variant_reference(q, k, v, 8, **kwargs)
    torch.testing.assert_close(plain, reference_attention(q, k, v, 8, **kwargs))
    torch.testing.assert_close(
        variant_reference(q, k, v, 8, dense_heads=9, **kwargs), reference_attention(q, k, v, **kwargs)
    )
    with_sinks = variant_reference(q, k, v, 8, sink_tokens=2, **kwargs)
    assert not torch.allclose(with_sinks[:, :, -1], plain[:, :, -1])  # the last token reads its document's first two
    # row 0's second document (indices 5..) has its sinks in its first group in every head: nothing changes there
    torch.testing.assert_close(with_sinks[0, :, 5:9], plain[0, :, 5:9])


@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_the_definition(kind):
    q, k, v = random_qkv(2, 9, 3, 37, seed=3)
    weights = torch.randn(2, 9, 37, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kwargs = arguments(kind, 37, seed=1)
    for sinks, dense in [(2, 0), (0, 2), (3, 1), (4, 9)]:
        got = [x.clone().requires_grad_() for x in (q, k, v)]
        (s2_attention(*got, 8, sink_tokens=sinks, num_dense_heads=dense, **kwargs).double() * weights).sum().backward()
        expected = [x.double().requires_grad_() for x in (q, k, v)]
        out = variant_reference(*expected, 8, sink_tokens=sinks, dense_heads=dense, **kwargs)
        (out * weights).sum().backward()
        for a, b, name in zip(got, expected, "qkv", strict=True):
            torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5, msg=f"d{name} {sinks=} {dense=}")


@pytest.mark.parametrize("sinks,dense", [(3, 0), (0, 2), (2, 2)])
def test_causal_by_gradients(sinks, dense):
    """The output at token i depends on no key or value after i, in any head, with the variants on."""
    q, k, v = random_qkv(1, 6, 2, 40, seed=7)
    for query_index in (0, 3, 17, 38):
        k_, v_ = k.clone().requires_grad_(), v.clone().requires_grad_()
        s2_attention(q, k_, v_, 8, sink_tokens=sinks, num_dense_heads=dense)[:, :, query_index].sum().backward()
        for grad in (k_.grad, v_.grad):
            assert grad[:, :, query_index + 1 :].abs().max() == 0
        # token 0 reads only itself: a softmax over one key, whose gradient by that key is exactly 0
        assert v_.grad[:, :, query_index].abs().sum() > 0
        assert query_index == 0 or k_.grad[:, :, query_index].abs().sum() > 0


def test_sinks_reach_the_first_tokens_of_the_document_only():
    """Token 30 of the second of two isolated documents reads that document's first 2 tokens, not the first's."""
    positions = packed_positions([[10, 30]])
    kwargs = {"position_ids": positions, "segment_ids": segment_ids_from_position_ids(positions)}
    q, k, v = random_qkv(1, 2, 1, 40, seed=2)
    k_ = k.clone().requires_grad_()
    s2_attention(q, k_, v, 8, sink_tokens=2, **kwargs)[:, :, 39].sum().backward()
    reached = set((k_.grad[0, 0].abs().sum(-1) > 0).nonzero().squeeze(1).tolist())
    # position 29 of document 2 (indices 10..39): its group is positions 24..31 (indices 34..39) in the unshifted
    # head, 28..35 (indices 38, 39) in the shifted one; the sinks are document 2's positions 0, 1 (indices 10, 11)
    assert reached == {10, 11, *range(34, 40)}


@pytest.mark.parametrize("num_heads,num_kv_heads,num_slices,dense", [(8, 2, 2, 3), (9, 3, 3, 2), (15, 5, 5, 8)])
def test_head_slices_compute_the_full_function(num_heads, num_kv_heads, num_slices, dense):
    """Ulysses hands each rank a slice of heads: the per-rank counts make the slices compute the whole function."""
    kwargs = arguments("isolated", 41)
    q, k, v = random_qkv(2, num_heads, num_kv_heads, 41, seed=5)
    heads, kv_heads = num_heads // num_slices, num_kv_heads // num_slices
    slices = []
    for rank in range(num_slices):
        counts = {
            "num_unshifted_heads": num_unshifted_heads(num_heads, num_slices, rank, dense),
            "num_dense_heads": num_dense_heads(num_heads, num_slices, rank, dense),
        }
        q_slice = q[:, rank * heads : (rank + 1) * heads]
        k_slice, v_slice = (x[:, rank * kv_heads : (rank + 1) * kv_heads] for x in (k, v))
        slices.append(s2_attention(q_slice, k_slice, v_slice, 8, sink_tokens=2, **counts, **kwargs))
    expected = variant_reference(q, k, v, 8, sink_tokens=2, dense_heads=dense, **kwargs)
    torch.testing.assert_close(torch.cat(slices, dim=1).double(), expected, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused():
    q, k, v = random_qkv(1, 4, 2, 16)
    with pytest.raises(UserError, match="sink_tokens=5 must be between 0 and G/2 = 4"):
        s2_attention(q, k, v, 8, sink_tokens=5)
    with pytest.raises(UserError, match="5 dense of 4 heads"):
        s2_attention(q, k, v, 8, num_dense_heads=5)
    with pytest.raises(UserError, match="3 unshifted of 4 heads \\(2 dense\\)"):
        s2_attention(q, k, v, 8, num_dense_heads=2, num_unshifted_heads=3)
    with pytest.raises(UserError, match="sink_tokens is computed by PyTorch SDPA"):
        s2_attention(q, k, v, 8, sink_tokens=2, backend="flash")


def tiny_model(**settings):
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register()
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="s2attn",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    attention.configure(model, group_size=8, **settings)
    return model


def test_registered_function_trains_the_variants_and_evaluates_densely():
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0))
    plain, variant = tiny_model(), tiny_model(sink_tokens=2, dense_heads=1)
    assert "sink_tokens" not in plain.config.s2attn  # a plain config is saved as before
    assert variant.config.s2attn["sink_tokens"] == 2 and variant.config.s2attn["dense_heads"] == 1
    plain.train(), variant.train()
    assert not torch.allclose(plain(ids).logits, variant(ids).logits)
    plain.eval(), variant.eval()
    torch.testing.assert_close(plain(ids).logits, variant(ids).logits)  # same weights, both dense in eval

    # the dense phase: training computes what evaluation does
    variant.train()
    attention.set_dense_training(variant, True)
    torch.testing.assert_close(variant(ids).logits, plain.eval()(ids).logits)
    attention.set_dense_training(variant, False)
    assert not torch.allclose(variant(ids).logits, plain(ids).logits)
    with pytest.raises(UserError, match="configure\\(\\) first"):
        from transformers import LlamaConfig

        attention.set_dense_training(LlamaConfig(), True)


def test_dense_attention_is_every_head_dense():
    q, k, v = random_qkv(2, 6, 3, 30, seed=9)
    kwargs = arguments("isolated", 30)
    torch.testing.assert_close(
        s2_attention(q, k, v, 8, num_dense_heads=6, **kwargs),
        dense_attention(q, k, v, segment_ids=kwargs["segment_ids"]),
    )


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["attention.sink_tokens=600"], "attention.sink_tokens=600 exceeds half the S²-Attn group size (512)"),
        (["attention.dense_phase=1.5"], "attention.dense_phase=1.5 must be in [0, 1]"),
        (["attention.dense_heads=-1"], "must be >= 0"),
        (["attention.implementation=sdpa", "attention.sink_tokens=4"], "but attention.implementation=sdpa"),
        (
            ["attention.dense_heads=2", "parallel.sequence_parallel_size=2", "parallel.sequence_parallel_mode=halo"],
            "halo computes plain S²-Attn",
        ),
    ],
)
def test_config_refuses_bad_variant_settings(overrides, fragment):
    from longctx.config import ConfigError, RunConfig, load_config

    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, "launch/presets/tiny-cpu.yaml", overrides)
    assert fragment in str(error.value)


def test_feasibility_refuses_more_dense_heads_than_the_model_has_and_variants_under_a_sliding_window():
    from transformers import LlamaConfig, MistralConfig

    from longctx.config import RunConfig, load_config
    from longctx.feasibility import run_problems

    cfg = load_config(RunConfig, "launch/presets/tiny-cpu.yaml", ["attention.dense_heads=7"])
    llama = LlamaConfig(num_attention_heads=6, num_key_value_heads=2, hidden_size=192, max_position_embeddings=256)
    assert any("attention.dense_heads=7 exceeds the 6 attention heads" in p for p in run_problems(cfg, llama))
    cfg = load_config(
        RunConfig, "launch/presets/tiny-cpu.yaml", ["attention.sink_tokens=4", "attention.group_size=256"]
    )
    mistral = MistralConfig(num_attention_heads=6, num_key_value_heads=2, hidden_size=192, sliding_window=512,
                            max_position_embeddings=256)  # fmt: skip
    assert any("beyond the sliding window" in p for p in run_problems(cfg, mistral))


def test_dense_phase_start():
    from longctx.config import RunConfig, load_config
    from longctx.trainer import dense_phase_start

    for phase, steps, start in [(0.0, 240, 240), (0.1, 240, 216), (0.25, 10, 8), (1.0, 7, 0)]:
        cfg = load_config(
            RunConfig, "launch/presets/tiny-cpu.yaml", [f"attention.dense_phase={phase}", f"train.max_steps={steps}"]
        )
        assert dense_phase_start(cfg) == start


def test_dense_phase_trains_its_last_steps_densely_and_resumes_into_it(tmp_path):
    """4 steps with attention.dense_phase=0.5: steps 1-2 are plain S²-Attn's (same losses as a run without the
    phase), steps 3-4 dense (different ones); killed while saving step 4 and resumed from step 3, inside the phase,
    the run ends bit-exactly where the uninterrupted one did."""
    from test_trainer_run import metrics, run_tiny

    run = ["attention.implementation=s2attn", "attention.group_size=16", "train.max_steps=4", "train.save_every=1"]
    run += ["train.keep_last=1", "train.schedule=constant"]
    phased = run_tiny(tmp_path / "phased", *run, "attention.dense_phase=0.5")
    assert phased.returncode == 0, phased.stderr[-3000:]
    assert "step 3: dense attention from here to step 4 (attention.dense_phase=0.5)" in phased.stdout
    plain = run_tiny(tmp_path / "plain", *run)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "dense attention" not in plain.stdout
    losses = {name: [m["loss"] for m in metrics(tmp_path / name)] for name in ("phased", "plain")}
    assert losses["phased"][:2] == losses["plain"][:2] and losses["phased"][2] != losses["plain"][2]

    killed = run_tiny(tmp_path / "resumed", *run, "attention.dense_phase=0.5", "--kill-during-save-at", "4")
    assert killed.returncode != 0
    resumed = run_tiny(tmp_path / "resumed", *run, "attention.dense_phase=0.5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3" in resumed.stdout and "step 4: dense attention from here to step 4" in resumed.stdout
    assert [m["loss"] for m in metrics(tmp_path / "resumed")] == losses["phased"]


def test_plan_counts_the_attention_each_variant_computes():
    from longctx.config import RunConfig, load_config
    from longctx.demo import PLAIN_S2ATTN
    from longctx.plan import score_entries

    def entries(*overrides, plain=True):
        first = PLAIN_S2ATTN if plain else []
        return score_entries(load_config(RunConfig, "launch/presets/tiny-cpu.yaml", [*first, *overrides]), 6)

    n, g = 2048, 1024  # the preset's N and G
    assert entries() == n * g / 2 * 6
    # The demo's preset trains the combination: 4 sinks, 1 dense head of 6, the last 25% of the steps dense.
    combined = 0.75 * ((n * g / 2 + 4 * n) * 5 + n * n / 2) + 0.25 * n * n / 2 * 6
    assert entries(plain=False) == combined
    assert entries("attention.implementation=sdpa") == entries("attention.dense_heads=6") == n * n / 2 * 6
    assert entries("attention.dense_phase=1.0") == n * n / 2 * 6
    assert entries("attention.sink_tokens=4", "attention.dense_heads=1") == (n * g / 2 + 4 * n) * 5 + n * n / 2
    assert entries("attention.dense_phase=0.25") == 0.75 * entries() + 0.25 * n * n / 2 * 6


def test_bf16_on_a_smollm2_shaped_model_follows_fp32():
    """The GPU presets' dtype on a real checkpoint's shape (9 heads over 3 kv heads, tied embeddings): the core in
    bf16 stays within bf16 rounding of the float64 reference, and a training forward + backward of the model with
    sinks and dense heads in bf16 follows the same model in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    q, k, v = random_qkv(2, 9, 3, 64, head_dim=16, dtype=torch.bfloat16, seed=11)
    kwargs = arguments("isolated", 64)
    got = s2_attention(q, k, v, 16, sink_tokens=4, num_dense_heads=2, **kwargs)
    assert got.dtype == torch.bfloat16
    expected = variant_reference(q, k, v, 16, sink_tokens=4, dense_heads=2, **kwargs)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)

    attention.register()
    config = LlamaConfig(
        vocab_size=96, hidden_size=144, intermediate_size=192, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=128, tie_word_embeddings=True, attn_implementation="s2attn",
    )  # fmt: skip
    torch.manual_seed(0)
    models = {dtype: LlamaForCausalLM(config).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    models[torch.bfloat16].load_state_dict(models[torch.float32].state_dict())
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(1))
    losses = {}
    for dtype, model in models.items():
        attention.configure(model, group_size=16, sink_tokens=4, dense_heads=2)
        model.train()
        loss = model(input_ids=ids, labels=ids, position_ids=kwargs["position_ids"]).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        losses[dtype] = loss.item()
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=1e-2)
