"""Activation-memory savers for very long sequences (the `memory` config section): tiled MLP, tiled loss, and
activation offload to host memory. Each computes the same values and gradients as the plain model (to fp32
round-off); only what is kept alive between forward and backward changes.

- Tiled MLP: each decoder MLP runs over the sequence in tiles, so only one tile's (tokens × intermediate)
  activations exist at a time; the backward recomputes them tile by tile (DeepSpeed ALST's TiledMLP).
- Tiled loss: the logits and the cross-entropy are computed chunk by chunk, in forward and again in backward, so
  the full (tokens × vocab) fp32 logits never exist; only one chunk's do.
- Activation offload: while the forward runs, tensors saved for backward (with activation checkpointing: each
  layer's input, the checkpoints) are moved to host memory and brought back when the backward needs them.
  Parameters stay where they are.

Both tiled computations are autograd functions that keep only their input: forward runs the tiles without a graph,
backward reruns each tile with one and back-propagates through it (a nested backward, as DeepSpeed's TiledMLP does,
rather than torch checkpointing, whose recompute check trips over ZeRO-3 releasing the weights between the
recompute and their use). Under ZeRO a weight is marked `ds_grad_is_ready` only for the last tile, so ZeRO reduces
its gradient once, after all tiles have added to it; a weight the enclosing backward adds to afterwards (a tied output
head, which the input embedding's backward adds to later) is left to that pass (`_trainable_and_accumulated_later`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from longctx.data import IGNORE_INDEX
from longctx.errors import UserError

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
        return _TiledMLPFunction.apply(x, mlp, num_shards)


class _TiledMLPFunction(torch.autograd.Function):
    """mlp(x) over tiles of dim 1; keeps only x for backward. x: (B, n, hidden) -> (B, n, hidden)."""

    @staticmethod
    def forward(ctx, x, mlp, num_shards):
        ctx.save_for_backward(x)
        ctx.mlp, ctx.num_shards = mlp, num_shards
        return torch.cat([mlp(tile) for tile in x.chunk(num_shards, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        tiles = _slices(x.shape[1], ctx.num_shards)
        params, accumulated_later = _trainable_and_accumulated_later(ctx.mlp)
        for last, tile in _with_last(tiles):
            with _grad_not_ready(accumulated_later if last else params), torch.enable_grad():
                x_tile = x[:, tile].detach().requires_grad_(grad_x is not None)
                torch.autograd.backward(ctx.mlp(x_tile), grad_output[:, tile])
            if grad_x is not None:
                grad_x[:, tile] = x_tile.grad
        return grad_x, None, None


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
    Works for any lm_head (frozen, trainable, LoRA-wrapped): it is simply called on each chunk.
    """
    # (B, n, hidden_size) -> (B·n, hidden_size): chunks of tokens, whatever the batch size
    return _TiledLossFunction.apply(hidden.flatten(0, 1), targets.flatten(), lm_head, chunk_tokens)


class _TiledLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, lm_head, chunk_tokens):
        ctx.save_for_backward(hidden, targets)
        ctx.lm_head, ctx.chunk_tokens = lm_head, chunk_tokens
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            total += _chunk_loss_sum(lm_head, hidden[chunk], targets[chunk])
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, targets = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        chunks = [slice(start, start + ctx.chunk_tokens) for start in range(0, hidden.shape[0], ctx.chunk_tokens)]
        params, accumulated_later = _trainable_and_accumulated_later(ctx.lm_head)
        for last, chunk in _with_last(chunks):
            with _grad_not_ready(accumulated_later if last else params), torch.enable_grad():
                hidden_chunk = hidden[chunk].detach().requires_grad_(grad_hidden is not None)
                torch.autograd.backward(_chunk_loss_sum(ctx.lm_head, hidden_chunk, targets[chunk]), grad_total)
            if grad_hidden is not None:
                grad_hidden[chunk] = hidden_chunk.grad
        return grad_hidden, None, None, None


def _slices(length: int, num_parts: int) -> list[slice]:
    """The slices torch.chunk(num_parts) cuts a dimension of `length` into."""
    step = math.ceil(length / num_parts)
    return [slice(start, start + step) for start in range(0, length, step)]


def _with_last(items: list) -> list[tuple[bool, object]]:
    return [(index == len(items) - 1, item) for index, item in enumerate(items)]


def _trainable_and_accumulated_later(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """module's trainable weights, and those among them that the running backward pass will still accumulate a
    gradient into after this autograd function's backward. Call from that backward, before any nested one.

    ZeRO (stage 1-3) reduces a weight's gradient in its gradient hook, once, when `ds_grad_is_ready` (default true) is
    set. The tiles' nested backwards mark every weight not ready but for the last tile, when its gradient is whole,
    except a weight tied to one used upstream of this function: `lm_head.weight` is `embed_tokens.weight` in SmolLM2,
    Llama-3.2-1B/3B and small Qwen2.5, and the embedding lookup's backward adds its part after the tiled loss's.
    Marked ready at the last tile, that weight was reduced with the head's part only, and the embedding's part then
    fired the hook a second time: ZeRO-2 stopped ("has already been reduced"), ZeRO-3 stopped (the weight twice in one
    bucket) or, when the bucket had been reduced in between, trained on with a wrong gradient. Kept not ready through
    every tile, it is reduced once, when the enclosing pass accumulates the rest and fires its hook.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    # The enclosing backward is the running graph task here (each nested backward is a graph task of its own). It runs
    # a weight's AccumulateGrad node once, after the backward of every use in its graph, so after this function's when
    # a use (the embedding lookup) lies upstream of it; a weight only this function's module uses is not in its graph.
    return params, [p for p in params if torch._C._will_engine_execute_node(get_gradient_edge(p).node)]


@contextlib.contextmanager
def _grad_not_ready(params: list[nn.Parameter]):
    """Tell ZeRO that params' gradients are incomplete after the backward run inside (see above)."""
    for param in params:
        param.ds_grad_is_ready = False
    try:
        yield
    finally:
        for param in params:
            param.ds_grad_is_ready = True


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
