"""Evaluation of models larger than one GPU: the balanced split of decoder layers over N devices, computed from the
config alone (checked for 2 and 4 fake GPUs), and a model loaded through a split map (all of it on the CPU here)
giving the logits of the model loaded whole. Without GPUs the transfers between devices are not exercised."""

import pytest
import torch

from longctx.errors import UserError
from longctx.evaluate import load_eval_model
from longctx.placement import balanced_device_map, check_device_map, load_across_gpus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("eight_layers")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def layer_devices(device_map, num_layers):
    """The device of each decoder layer, read from a map that may name whole submodules."""

    def device_of(name):
        while name not in device_map:
            name = name.rpartition(".")[0]
        return device_map[name]

    return [device_of(f"model.layers.{i}") for i in range(num_layers)]


@pytest.mark.parametrize("num_devices", [2, 4])
def test_layers_split_in_contiguous_balanced_groups(model_dir, num_devices):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    device_map = balanced_device_map(config, list(range(num_devices)), torch.float32)
    devices = layer_devices(device_map, 8)
    assert devices == sorted(devices)  # contiguous groups, in order
    counts = [devices.count(d) for d in range(num_devices)]
    assert all(count >= 1 for count in counts) and max(counts) - min(counts) <= 2, counts
    assert device_map.get("model.embed_tokens", device_map.get("model")) == 0
    assert device_map.get("lm_head") == num_devices - 1


def test_a_split_model_gives_the_logits_of_the_whole_one(model_dir, monkeypatch):
    import longctx.placement as placement

    maps = []

    def split_on_cpu(config, devices, dtype):  # the map of two GPUs with both "GPUs" the CPU
        maps.append({name: "cpu" for name in balanced_device_map(config, [0, 1], dtype)})
        return maps[-1]

    monkeypatch.setattr(placement, "balanced_device_map", split_on_cpu)
    model = load_across_gpus(model_dir, devices=["cpu", "cpu"], dtype=torch.float32)
    assert len(maps) == 1 and len(maps[0]) > 2  # loaded module by module through the split map
    tokens = torch.randint(3, 259, (2, 96), generator=torch.Generator().manual_seed(0))
    whole = load_eval_model(model_dir, device=torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, whole(input_ids=tokens).logits)


def test_checkpoints_and_machines_without_gpus_are_refused(model_dir, tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(UserError, match="is a training checkpoint: export it first"):
        load_across_gpus(tmp_path)
    with pytest.raises(UserError, match="is a training checkpoint: export it first"):
        check_device_map({"run": str(tmp_path)}, "balanced")
    check_device_map({"run": str(tmp_path)}, "none")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="none is visible: drop --device-map"):
            load_across_gpus(model_dir)


def test_a_launched_process_is_refused(model_dir, monkeypatch):
    """One process drives every GPU: under a launcher (WORLD_SIZE > 1) each rank would load the whole model."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one of 2 launched processes: run it without the deepspeed launcher"):
        check_device_map({"m": str(model_dir)}, "balanced")
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_device_map({"m": str(model_dir)}, "balanced")
