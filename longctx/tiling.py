"""Activation-memory savers for very long sequences (the `memory` config section): tiled MLP, tiled loss, and
activation offload to host memory. Each computes the same values and gradients as the plain model (to fp32
round-off); only what is kept alive between forward and backward changes.

- Tiled MLP: each decoder MLP runs over the sequence in tiles, each tile under (non-reentrant) activation
  checkpointing, so only one tile's (tokens × intermediate) activations exist at a time, in forward and when the
  backward recomputes them. DeepSpeed ALST's TiledMLP does the same with a hand-written autograd function; checkpoint
  gives one autograd graph, so parameter gradients accumulate once per step as usual, ZeRO-3 included.
- Tiled loss: the logits and the cross-entropy are computed chunk by chunk, again under checkpointing, so the full
  (tokens × vocab) fp32 logits never exist; only one chunk's do.
- Activation offload: while the forward runs, tensors saved for backward (with activation checkpointing: each
  layer's input, the checkpoints) are moved to host memory and brought back when the backward needs them.
  Parameters stay where they are.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longctx.errors import UserError

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------
# Tiled MLP
# ----------------------------------------------------------------------------------------------------------------


class TiledMLP(nn.Module):
    """An MLP module run over the sequence (dim 1) in tiles; the same children, under the same names.

    The wrapped MLP's submodules (gate_proj, up_proj, down_proj, ...) are registered on this module directly, so the
    parameter names, the state dict and what peft or ZeRO-3 see are those of the plain model; the MLP's own forward
    is called on each tile.
    """

    def __init__(self, mlp: nn.Module, num_shards: int = 0):
        super().__init__()
        if next(mlp.parameters(recurse=False), None) is not None:
            raise UserError(
                f"memory.tiled_mlp cannot wrap {type(mlp).__name__}, which holds parameters of its own: "
                "set memory.tiled_mlp=false"
            )
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.num_shards = num_shards
        self._mlp = (mlp,)  # a tuple: not registered as a submodule, its children already are ours

    def shards_for(self, x: torch.Tensor) -> int:
        """Tiles for input x (B, n, hidden): num_shards, or ceil(n / hidden) (a tile of ~hidden tokens)."""
        return max(1, min(x.shape[1], self.num_shards or math.ceil(x.shape[1] / x.shape[-1])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self._mlp[0]
        num_shards = self.shards_for(x)
        if num_shards == 1:
            return mlp(x)
        tiles = x.chunk(num_shards, dim=1)  # (B, n / shards, hidden) each
        if not torch.is_grad_enabled():
            return torch.cat([mlp(tile) for tile in tiles], dim=1)
        return torch.cat([checkpoint(mlp, tile, use_reentrant=False) for tile in tiles], dim=1)


def apply_tiled_mlp(model: nn.Module, num_shards: int = 0) -> int:
    """Replace every decoder layer's `mlp` child by a TiledMLP around it; returns how many were wrapped."""
    wrapped = 0
    for module in list(model.modules()):
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Module) and not isinstance(mlp, TiledMLP) and "mlp" in dict(module.named_children()):
            module.mlp = TiledMLP(mlp, num_shards)
            wrapped += 1
    if not wrapped:
        raise UserError(
            f"memory.tiled_mlp found no `mlp` submodule in {type(model).__name__}: set memory.tiled_mlp=false"
        )
    return wrapped


# ----------------------------------------------------------------------------------------------------------------
# Tiled loss
# ----------------------------------------------------------------------------------------------------------------


def _chunk_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (chunk, V): the only logits alive at a time
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def tiled_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Sum of cross-entropies of lm_head(hidden) against targets, chunk_tokens at a time (float32).

    hidden: (B, n, hidden_size), the final normed hidden states; targets: (B, n) token ids, IGNORE_INDEX skipped.
    Each chunk runs under checkpointing: its logits are freed after its forward and recomputed in backward.
    Works for any lm_head (frozen, trainable, LoRA-wrapped): it is simply called on each chunk.
    """
    hidden = hidden.flatten(0, 1)  # (B·n, hidden_size)
    targets = targets.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, lm_head, hidden[chunk], targets[chunk], use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, hidden[chunk], targets[chunk])
    return total


# ----------------------------------------------------------------------------------------------------------------
# Activation offload
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def offload_activations(enabled: bool = True):
    """While active, tensors autograd saves for backward live in host memory (pinned), not on the accelerator.

    With activation checkpointing, what the forward saves is each layer's input (the checkpoints), so those move
    to the host and come back one layer at a time in backward. Parameters (saved by every matmul) and tensors
    already on the CPU are kept as they are.
    """
    if not enabled:
        yield
        return

    def pack(tensor: torch.Tensor):
        if _is_parameter(tensor) or tensor.device.type == "cpu":
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter or a view of one (a matmul saves its weight as weight.t(), whose base is the parameter)."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
