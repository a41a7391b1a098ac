"""S²-Attn builds its token layout once per forward pass: every later layer and the activation-checkpoint recompute
reuse it, with the same losses and gradients as building it in every layer. Also under the sequence-parallel
wrappers (Ulysses and halo), whose core attention gets new position tensors in every layer."""

import builtins
import collections
import gc
import sys

import pytest
import torch
from test_attention import packed_positions, random_qkv
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface

from longctx import attention, parallel

NUM_LAYERS = 4
SEQ_LEN = 24
GROUP_SIZE = 8
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
PACKED = torch.cat([torch.arange(9), torch.arange(15)])[None]


@pytest.fixture(scope="module", autouse=True)
def registered():
    attention.register()


@pytest.fixture
def builds(monkeypatch):
    """Calls, by name, of the layout build, the segment-id derivation and the windowed attention itself; with plain
    positions too on the layout (what GPUs compute: on the CPU they are computed in place, without one)."""
    monkeypatch.setattr(attention, "_in_place_windows", False)
    counts = collections.Counter()

    def count(name):
        function = getattr(attention, name)

        def counted(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        monkeypatch.setattr(attention, name, counted)

    for name in ("_run_layout", "segment_ids_from_position_ids", "_sdpa_over_windows"):
        count(name)
    return counts


@pytest.fixture
def registries(monkeypatch):
    """transformers' attention registries as they were before the test: it registers wrappers around fakes."""
    for registry in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.setattr(registry, "_global_mapping", dict(registry._global_mapping))


def checkpointed_model(**config_overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY | config_overrides), attn_implementation="s2attn")
    attention.configure(model, group_size=GROUP_SIZE)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def batch(case):
    input_ids = torch.randint(0, TINY["vocab_size"], (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": input_ids, "labels": input_ids}
    if case == "packed":
        kwargs["position_ids"] = PACKED.clone()
    elif case == "padded":
        attention_mask = torch.ones(2, SEQ_LEN, dtype=torch.long)
        attention_mask[1, 17:] = 0
        kwargs["attention_mask"] = attention_mask
        kwargs["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    return kwargs


def loss_and_grads(model, kwargs):
    model.zero_grad()
    loss = model(**kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["plain", "packed", "padded"])
def test_one_layout_per_forward_with_checkpointing_and_the_uncached_result(case, builds, monkeypatch):
    model = checkpointed_model()
    loss, grads = loss_and_grads(model, batch(case))
    # Every layer's attention ran twice (forward and recompute), on one layout and one segment derivation.
    assert builds["_sdpa_over_windows"] == 2 * NUM_LAYERS
    assert builds["_run_layout"] == 1
    assert builds["segment_ids_from_position_ids"] == 1

    builds.clear()
    monkeypatch.setattr(attention, "_cache_layouts", False)
    expected_loss, expected_grads = loss_and_grads(model, batch(case))
    assert builds["_run_layout"] == builds["segment_ids_from_position_ids"] == 2 * NUM_LAYERS  # what was built
    assert torch.equal(loss, expected_loss)
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grad), name


def test_plain_positions_on_the_cpu_build_no_layout_and_train_as_the_layout_does(builds, monkeypatch):
    model = checkpointed_model(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    attention.configure(model, group_size=GROUP_SIZE, sink_tokens=2, dense_heads=1)
    expected_loss, expected_grads = loss_and_grads(model, batch("plain"))
    assert builds["_run_layout"] == 2  # the layout path: one per offset (the dense head's pass has its own too)
    builds.clear()
    monkeypatch.setattr(attention, "_in_place_windows", True)
    loss, grads = loss_and_grads(model, batch("plain"))
    assert builds["_run_layout"] == builds["_sdpa_over_windows"] == 0
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["plain", "packed"])
def test_an_odd_head_count_builds_one_layout_per_offset(case, builds, monkeypatch):
    """9 heads are two passes (heads 0..3 unshifted, 4..8 shifted), each on the layout of its group offset: two builds
    per forward pass, shared by every layer and the recompute, with the result of building them in every layer."""
    model = checkpointed_model(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    loss, grads = loss_and_grads(model, batch(case))
    assert builds["_sdpa_over_windows"] == 2 * 2 * NUM_LAYERS  # two passes per attention call
    assert builds["_run_layout"] == 2

    builds.clear()
    monkeypatch.setattr(attention, "_cache_layouts", False)
    expected_loss, expected_grads = loss_and_grads(model, batch(case))
    assert builds["_run_layout"] == 2 * 2 * NUM_LAYERS
    assert torch.equal(loss, expected_loss)
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grad), name


def test_new_or_changed_position_ids_build_again(builds):
    model = checkpointed_model()
    kwargs = batch("packed")
    loss_and_grads(model, kwargs)
    loss_and_grads(model, kwargs)  # the same, unchanged tensor: its layout still holds
    assert builds["_run_layout"] == 1

    other = {**kwargs, "position_ids": torch.cat([torch.arange(13), torch.arange(11)])[None]}
    other_loss, _ = loss_and_grads(model, other)
    assert builds["_run_layout"] == 2
    # Changed in place into `other`'s positions: built again, and what `other` gave, not the stale layout.
    kwargs["position_ids"].copy_(other["position_ids"])
    loss, _ = loss_and_grads(model, kwargs)
    assert builds["_run_layout"] == 3
    assert torch.equal(loss, other_loss)


def test_an_entry_dies_with_its_position_ids():
    model = checkpointed_model()
    kwargs = batch("packed")
    loss_and_grads(model, kwargs)
    key = id(kwargs["position_ids"])
    assert key in attention._ENTRIES
    del kwargs
    gc.collect()
    assert key not in attention._ENTRIES  # nothing of a step outlives its position ids


def test_eval_forward_derives_segments_once(builds):
    model = checkpointed_model().eval()
    with torch.no_grad():
        model(batch("packed")["input_ids"], position_ids=PACKED.clone())
    assert builds["segment_ids_from_position_ids"] == 1
    assert builds["_run_layout"] == 1  # dense attention within documents runs on S²-Attn's runs


class FakeUlysses:
    """DeepSpeed's UlyssesSPAttentionHF on one rank, as far as the core attention sees it: the position ids are
    gathered into a new tensor in every layer, the other arguments passed on."""

    def __init__(self, attn, **_):
        self.attn = attn

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        kwargs["position_ids"] = torch.cat([kwargs["position_ids"]], dim=1)
        return self.attn(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("core", ["s2attn", "sdpa"])
def test_ulysses_builds_one_layout_per_forward(core, builds, registries, monkeypatch):
    from deepspeed.runtime.sequence_parallel import ulysses_sp

    monkeypatch.setattr(ulysses_sp, "UlyssesSPAttentionHF", FakeUlysses)
    model = checkpointed_model()
    sp = parallel.SequenceParallel()
    model.set_attn_implementation(parallel.register_ulysses_attention(model.config, sp, micro_batch_size=2, core=core))
    loss, grads = loss_and_grads(model, batch("packed"))
    assert builds["_run_layout"] == builds["segment_ids_from_position_ids"] == 1

    if core == "s2attn":  # one rank holds all heads: the plain S²-Attn model's loss and gradients
        model.set_attn_implementation("s2attn")
        expected_loss, expected_grads = loss_and_grads(model, batch("packed"))
        assert torch.equal(loss, expected_loss)
        for name, grad in expected_grads.items():
            assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("rank", [0, 1])
def test_halo_builds_one_layout_per_forward(rank, builds, registries, monkeypatch):
    # No process group: the neighbour's halo (and the halo's gradient) arrive as zeros.
    monkeypatch.setattr(parallel, "_shift", lambda tensor, sp, step: torch.zeros_like(tensor))
    model = checkpointed_model()
    sp = parallel.SequenceParallel(size=2, rank=rank)
    model.set_attn_implementation(parallel.register_halo_attention(sp))
    loss_and_grads(model, batch("plain"))
    assert builds["_sdpa_over_windows"] == 2 * NUM_LAYERS
    assert builds["_run_layout"] == 1


def test_a_layout_key_serves_only_its_segments_and_settings(builds):
    """Through the public API: another segment_ids tensor, G or head split under the same key is another layout."""
    position_ids = packed_positions([[7, 19, 14]])
    q, k, v = random_qkv(1, 8, 2, 40, seed=4)
    documents = attention.segment_ids_from_position_ids(position_ids)
    one_segment = torch.zeros_like(documents)
    calls = [  # (arguments, layouts built)
        (dict(group_size=8, segment_ids=documents), 1),
        (dict(group_size=8, segment_ids=documents), 0),  # the same: reused
        (dict(group_size=8, segment_ids=one_segment), 1),
        (dict(group_size=6, segment_ids=one_segment), 1),
        (dict(group_size=6, segment_ids=one_segment, num_unshifted_heads=0), 1),  # one block, offset G/2
        (dict(group_size=6, segment_ids=one_segment, num_unshifted_heads=3), 1),  # + one block, offset 0
        (dict(group_size=6, segment_ids=one_segment, num_unshifted_heads=8), 0),  # offset 0 only: built just now
    ]
    for kwargs, num_built in calls:
        before = builds["_run_layout"]
        got = attention.s2_attention(q, k, v, position_ids=position_ids, layout_key=position_ids, **kwargs)
        assert builds["_run_layout"] - before == num_built, kwargs
        assert torch.equal(got, attention.s2_attention(q, k, v, position_ids=position_ids, **kwargs))


def test_a_missing_flash_attn_is_looked_up_once(monkeypatch):
    imports = []
    real_import = builtins.__import__

    def counting_import(name, *args, **kwargs):
        imports.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` fails as when it is not installed
    monkeypatch.setattr(builtins, "__import__", counting_import)
    attention._flash_varlen.cache_clear()
    try:
        assert [attention._flash_varlen() for _ in range(3)] == [None] * 3
    finally:
        attention._flash_varlen.cache_clear()  # later callers see the real flash-attn (or its absence)
    assert imports.count("flash_attn") == 1
