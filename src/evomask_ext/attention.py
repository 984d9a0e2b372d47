"""Attention similarity from a ViT's own forward: the input of the evolved masks (EHM Sec. V-E).

The probabilities are read, never re-derived: for each block read, the one attention module in it
(a module with an ``attn_drop`` dropout, as in every timm ViT family and in the timm versions
facebookresearch/mae builds on) runs with fused attention off, and a hook on ``attn_drop`` records
the softmax it is given. Whatever the model does before the softmax (relative position bias,
shared relative positions, RoPE, q/k norms, register tokens) is therefore what we read, and the
pass stops as soon as the last needed probabilities are recorded.

What cannot be read this way is refused with an error naming the model or block and the reason:
no attention module, several in one block (parallel attention), differential attention (a
difference of two softmaxes, not a probability map), or a recorded tensor that is not a softmax
over the token sequence (e.g. talking heads that mix heads after the softmax, windowed attention).

One exception to "read, never re-derived", in :func:`attention_maps` only: when every block it
runs is a timm ``Block`` / ``ResPostBlock`` whose attention is exactly timm's plain ``Attention``
(no subclass, no patched forward, a hook-free ``nn.Dropout`` as ``attn_drop``), nothing can stand
between that class's softmax and its ``attn_drop``, so the probabilities are a known function of
its q and k. Those blocks then run with fused attention on (``scaled_dot_product_attention``) and
the probabilities are computed once per read block from the very q and k tensors the block hands
to its attention kernel (forward hooks on its ``q_norm`` / ``k_norm``, so q/k norms included and
no projection recomputed), as timm's unfused forward computes them: ``softmax(q * scale @ k^T)``,
the matmul in the autocast dtype, the softmax and the head and layer reductions in float32, one
float32 ``[B, heads, rows, T]`` at a time. See :class:`_FusedReader`.
"""

from __future__ import annotations

import collections
import inspect
import sys
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from ._checks import (
    ArgumentTypeError,
    _module_device,
    _require_bool,
    _require_finite,
    _require_floating,
    _require_int,
    _require_same_device,
    _require_tensor,
)

__all__ = ["AttentionMaps", "block_attention_probs", "attention_maps", "attention_similarity"]

# Rows of a softmax sum to one; bf16/fp16 probabilities carry about 3 significant digits.
_ROW_SUM_TOLERANCE = 2e-2

#: Private switch: False makes attention_maps take the hook path for every model (tests compare
#: both paths with it; bench/profile_step.py --attention-path hook sets it).
_FUSED_PATH = True

#: Private counter of the paths attention_maps took ("fused" / "hook"), one per call that ran blocks.
_PATH_CALLS: collections.Counter = collections.Counter()


class AttentionMaps(NamedTuple):
    """Head- and layer-averaged attention of a token sequence with one leading CLS token."""

    patch: torch.Tensor | None  #: [B, N, N] patch-to-patch attention of the first layers, CLS dropped
    cls: torch.Tensor | None  #: [B, N] CLS-to-patch attention of the last block run, heads averaged


class _StopForward(Exception):
    """Raised from the last hook: nothing after the last probabilities read is needed."""


def _attention_module(block: Any, name: str) -> nn.Module:
    """The single softmax-attention module inside ``block`` (possibly ``block`` itself)."""
    if not isinstance(block, nn.Module):
        raise ArgumentTypeError(
            f"{name} must be a timm ViT Block (a module holding one softmax attention with attn_drop), "
            f"got {type(block).__name__}"
        )
    found = [m for m in block.modules() if isinstance(getattr(m, "attn_drop", None), nn.Module)]
    if not found:
        raise ArgumentTypeError(
            f"{name} must be a timm ViT Block (a module holding one softmax attention with attn_drop), "
            f"got {type(block).__name__}, which holds no such attention"
        )
    if len(found) > 1:
        raise ArgumentTypeError(
            f"{name} ({type(block).__name__}) holds {len(found)} attention modules (parallel attention): "
            "which probabilities are the block's is ambiguous, so this block is not supported"
        )
    attn = found[0]
    if hasattr(attn, "proj_l") and hasattr(attn, "proj_w"):
        raise ArgumentTypeError(
            f"{name} ({type(block).__name__}) uses talking-heads attention, which mixes the heads after the "
            "softmax, so the tensor it drops out is not a probability map: not supported"
        )
    if hasattr(attn, "lambda_init") or hasattr(attn, "_compute_lambda"):
        raise ArgumentTypeError(
            f"{name} ({type(block).__name__}) uses differential attention, a difference of two softmaxes "
            "rather than a probability map, so its attention cannot be read as a similarity"
        )
    return attn


class _Recorder:
    """Records the softmax probabilities of chosen blocks during one forward pass.

    ``reduce="heads"`` keeps each read block's head average in float32 ([B, T, T]) and its head
    count in ``heads``; ``reduce="none"`` keeps the full [B, heads, T, T] probabilities.
    """

    def __init__(self, modules: dict[int, nn.Module], names: dict[int, str], *, reduce: str = "heads"):
        self.modules = modules
        self.names = names
        self.reduce = reduce
        self.last = max(modules) if modules else -1
        self.probs: dict[int, torch.Tensor] = {}
        self.calls: dict[int, int] = {i: 0 for i in modules}
        self.heads: dict[int, int] = {}

    def _hook(self, index: int):
        def record(module: nn.Module, args: tuple) -> None:
            self.calls[index] += 1
            probs = args[0] if args else None
            self._check(index, probs)
            self.heads[index] = probs.shape[1]
            if self.reduce == "heads":
                probs = probs.mean(dim=1, dtype=torch.float32)
            else:
                probs = probs.float()
            self.probs[index] = probs
            if index == self.last:
                raise _StopForward

        return record

    def _check(self, index: int, probs: Any) -> None:
        name = self.names[index]
        if self.calls[index] > 1:
            raise ArgumentTypeError(f"{name} computed its attention more than once in one forward: not supported")
        if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
            shape = list(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            raise ArgumentTypeError(
                f"{name}: the tensor its attention passes to attn_drop is {shape}, not [B, heads, T, T] "
                "probabilities over the token sequence: this attention is not supported"
            )

    @contextmanager
    def attached(self) -> Iterator["_Recorder"]:
        """Fused attention off and hooks on for the pass; both undone on every exit."""
        handles, fused = [], {}
        try:
            for index, module in self.modules.items():
                if hasattr(module, "fused_attn"):
                    fused[index] = module.fused_attn
                    module.fused_attn = False
                handles.append(module.attn_drop.register_forward_pre_hook(self._hook(index)))
            try:
                yield self
            except _StopForward:
                pass
        finally:
            for handle in handles:
                handle.remove()
            for index, value in fused.items():
                self.modules[index].fused_attn = value

    def result(self, index: int) -> torch.Tensor:
        if index not in self.probs:
            raise ArgumentTypeError(
                f"{self.names[index]} did not pass its probabilities through its attn_drop during the forward "
                "(an attention that never materialises them): not supported"
            )
        return self.probs[index]

    def check_softmax(self, tensors: Sequence[torch.Tensor]) -> None:
        """Refuses recorded tensors whose rows are not probabilities (one host sync for all).

        NaN/Inf rows pass: a diverged encoder's attention is the caller's to report."""
        worst = None
        for probs in tensors:
            if probs.numel() == 0:
                continue
            rows = probs.sum(dim=-1)
            err = torch.maximum((rows - 1).abs().amax(), (-probs).amax().clamp_min(0))
            err = torch.nan_to_num(err, nan=0.0, posinf=0.0)
            worst = err if worst is None else torch.maximum(worst, err)
        if worst is not None and float(worst) > _ROW_SUM_TOLERANCE:
            names = ", ".join(self.names[i] for i in sorted(self.probs))
            raise ArgumentTypeError(
                f"the attention recorded in {names} is not a softmax over the tokens (its rows are off a "
                f"probability distribution by up to {float(worst):.3g}, more than {_ROW_SUM_TOLERANCE:g}): heads "
                "mixed after the softmax or another attention form; not supported"
            )


def _timm_plain_attention_types() -> tuple[type | None, tuple[type, ...]]:
    """timm's plain ``Attention`` class and its ViT blocks that call it as ``attn(norm1(x))`` /
    ``attn(x)``, if timm is imported (a timm block in ``blocks`` means it is); ``(None, ())``
    otherwise. Looked up in ``sys.modules`` so evomask_ext neither imports nor needs timm."""
    vit = sys.modules.get("timm.models.vision_transformer")
    if vit is None:
        return None, ()
    blocks = tuple(t for t in (getattr(vit, "Block", None), getattr(vit, "ResPostBlock", None)) if isinstance(t, type))
    attention = getattr(vit, "Attention", None)  # timm.layers.Attention, re-exported (defined there before 1.0)
    return (attention if isinstance(attention, type) else None), blocks


def _fusable(blocks: Sequence[nn.Module]) -> bool:
    """Whether every block run may take the fused path (see :class:`_FusedReader`).

    Each must be exactly a timm ``Block`` / ``ResPostBlock`` holding exactly timm's ``Attention``
    (not a subclass, which may change the scores, as RelPos, RoPE, EVA and BEiT attentions add to
    them before the softmax), neither with a forward patched onto the instance; its ``attn_drop`` a plain ``nn.Dropout``
    without hooks (nothing between softmax and dropout can change the probabilities, and no hook
    expects to see them); separate ``q_norm`` / ``k_norm`` modules; no attention module shared
    between blocks. Anything else takes the hook path, which reads whatever the model computes.
    """
    if not _FUSED_PATH or not blocks:
        return False
    attention_type, block_types = _timm_plain_attention_types()
    if attention_type is None or not block_types:
        return False
    seen: set[int] = set()
    for block in blocks:
        if type(block) not in block_types or "forward" in vars(block):
            return False
        attn = getattr(block, "attn", None)
        if type(attn) is not attention_type or "forward" in vars(attn) or id(attn) in seen:
            return False
        seen.add(id(attn))
        if not all(hasattr(attn, name) for name in ("q_norm", "k_norm", "scale", "fused_attn")):
            return False  # a timm whose Attention predates q/k norms
        if not isinstance(attn.q_norm, nn.Module) or not isinstance(attn.k_norm, nn.Module) or attn.q_norm is attn.k_norm:
            return False
        drop = attn.attn_drop
        if type(drop) is not nn.Dropout or drop._forward_hooks or drop._forward_pre_hooks:
            return False
    return True


class _FusedReader:
    """The fused path of :func:`attention_maps` for timm's plain ``Attention`` (see :func:`_fusable`).

    timm's ``Attention.forward`` is ``qkv -> (q, k, v) -> q, k = q_norm(q), k_norm(k) ->`` either
    ``scaled_dot_product_attention(q, k, v)`` (fused) or ``softmax(q * scale @ k^T) -> attn_drop ->
    @ v`` (unfused; no mask here, since ``attention_maps`` runs ``block(x)``). The read blocks run
    fused, and forward hooks on ``q_norm`` and ``k_norm`` (called in that order, once each) take the
    q and k tensors the kernel gets: exactly the block's, q/k norms included, with no projection
    or norm recomputed (a hook on ``qkv`` would have to re-apply the norms; a hook on the module's
    input, the whole qkv matmul). From them the probabilities are computed as the unfused forward
    does, ``softmax(q * scale @ k^T)``: the matmul in q's dtype (bf16 under autocast, as unfused
    timm), the softmax in float32, reduced over heads at once (mean, or sum for ``reduce="sum"``)
    into one float32 ``[B, N, N]`` accumulator; only the rows needed are computed (the N patch rows
    for ``patch``, row 0 alone for a block read only for ``cls``), so at most one float32
    ``[B, heads, rows, T]`` exists at a time and none outlives its block. The last read block stops
    in its ``k_norm`` hook, before its attention kernel. The rows are a softmax by construction, so
    no row-sum check (and no host sync) is needed.
    """

    def __init__(self, modules: dict[int, nn.Module], patch_layers: int, cls_index: int | None, prefix: int,
                 reduce: str):
        self.modules = modules
        self.patch_layers = patch_layers
        self.cls_index = cls_index
        self.prefix = prefix
        self.reduce = reduce
        self.last = max(modules)
        self.patch: torch.Tensor | None = None
        self.cls: torch.Tensor | None = None
        self.done: set[int] = set()
        self._q: dict[int, torch.Tensor] = {}

    def _q_hook(self, index: int):
        def keep(module: nn.Module, args: tuple, q: torch.Tensor) -> None:
            self._q[index] = q

        return keep

    def _k_hook(self, index: int):
        def record(module: nn.Module, args: tuple, k: torch.Tensor) -> None:
            q = self._q.pop(index, None)
            if q is None or index in self.done:
                raise ArgumentTypeError(
                    f"blocks[{index}]: its attention did not call q_norm then k_norm once each, as timm's "
                    "Attention does: the fused attention path cannot read it"
                )
            self._record(index, q, k)
            self.done.add(index)
            if index == self.last:
                raise _StopForward

        return record

    def _record(self, index: int, q: torch.Tensor, k: torch.Tensor) -> None:
        attn = self.modules[index]
        in_patch, in_cls, p = index < self.patch_layers, index == self.cls_index, self.prefix
        if in_cls:
            rows = q if in_patch else q[:, :, :1]  # [B, H, T or 1, hd]
        else:
            rows = q[:, :, p:]  # [B, H, N, hd]: the patch rows only
        rows = rows * attn.scale  # as timm's unfused forward: q scaled, then the matmul (autocast dtype)
        probs = torch.softmax(rows @ k.transpose(-2, -1), dim=-1, dtype=torch.float32)  # [B, H, rows, T]
        if in_cls:
            self.cls = probs[:, :, 0, p:].mean(dim=1)
        if in_patch:
            patch = probs[:, :, p:, p:] if in_cls else probs[..., p:]
            patch = patch.mean(dim=1) if self.reduce == "mean" else patch.sum(dim=1)
            self.patch = patch if self.patch is None else self.patch.add_(patch)

    @contextmanager
    def attached(self) -> Iterator["_FusedReader"]:
        """Fused attention on and q/k hooks on for the pass; both undone on every exit."""
        handles, fused = [], {}
        try:
            for index, module in self.modules.items():
                fused[index] = module.fused_attn
                module.fused_attn = True
                handles.append(module.q_norm.register_forward_hook(self._q_hook(index)))
                handles.append(module.k_norm.register_forward_hook(self._k_hook(index)))
            try:
                yield self
            except _StopForward:
                pass
        finally:
            for handle in handles:
                handle.remove()
            for index, value in fused.items():
                self.modules[index].fused_attn = value
            self._q.clear()

    def maps(self) -> AttentionMaps:
        missing = sorted(set(self.modules) - self.done)
        if missing:
            raise ArgumentTypeError(
                f"blocks[{missing[0]}] did not run its attention's q_norm / k_norm during the forward: the "
                "fused attention path cannot read it"
            )
        patch = self.patch
        if patch is not None and self.reduce == "mean":
            patch = patch / self.patch_layers
        return AttentionMaps(patch=patch, cls=self.cls)


def _eval_mode(model: nn.Module):
    """Switches ``model`` to eval (no dropout, no patch dropout, no drop path) until exit."""

    @contextmanager
    def switched() -> Iterator[None]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode

    return switched()


# Block arguments that carry positions computed once by the model (RoPE tables, shared relative
# position biases): run as ``block(x)``, such a block silently attends without them.
_MODEL_LEVEL_INPUTS = ("rope", "rel_pos", "pos_embed", "rot_pos")


def _needs_model_inputs(block: nn.Module) -> str | None:
    try:
        params = list(inspect.signature(block.forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    for param in params:
        if any(key in param for key in _MODEL_LEVEL_INPUTS):
            return param
    return None


def block_attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities ``[B, heads, T, T]`` of ``block`` on its input ``x``, in float32.

    ``block`` is a timm ViT block (any module holding one softmax attention with ``attn_drop``);
    ``x`` its floating-point ``[B, T, D]`` input on the block's device. The block runs as
    ``block(x)`` in eval mode with its attention unfused, and the probabilities it computes are
    returned. An empty batch gives an empty ``[0, heads, T, T]`` result. NaN/Inf in ``x`` propagate.
    """
    attn = _attention_module(block, "block")
    _refuse_model_level_inputs(block, "block")
    _check_tokens(x, "x", block)
    recorder = _Recorder({0: attn}, {0: "block"}, reduce="none")
    with torch.no_grad(), _eval_mode(block), recorder.attached():
        block(x)
    probs = recorder.result(0)
    recorder.check_softmax([probs])
    return probs


def _refuse_model_level_inputs(block: nn.Module, name: str) -> None:
    param = _needs_model_inputs(block)
    if param is not None:
        raise ArgumentTypeError(
            f"{name} ({type(block).__name__}) takes `{param}` from its model (RoPE or shared relative "
            "positions): run on its own it would attend without them. Use "
            "evomask_ext.attention_similarity(model, images), which reads the model's own forward"
        )


def _check_tokens(tokens: Any, name: str, module: nn.Module, *, min_tokens: int = 1) -> None:
    """tokens: a floating-point ``[B, T, D]`` tensor of the blocks' width on ``module``'s device,
    ``T >= min_tokens``. NaN/Inf values are not checked here: they propagate into the maps, where
    the caller checks them (the trainer stops a diverged run with its NonFiniteError)."""
    _require_tensor(tokens, name)
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be a [B, T, D] token sequence, got shape {list(tokens.shape)}")
    if tokens.shape[1] < min_tokens:
        raise ValueError(f"{name} must hold at least {min_tokens} tokens, got shape {list(tokens.shape)}")
    _require_floating(tokens, name)
    width = getattr(getattr(module, "norm1", None), "normalized_shape", None)
    if width and tokens.shape[-1] != width[-1]:
        raise ValueError(
            f"{name} must have D = {width[-1]} features (the blocks' width), got shape {list(tokens.shape)}"
        )
    device = _module_device(module)
    if device is not None:
        _require_same_device(tokens, name, device, "the model's parameters")


_REDUCTIONS = ("mean", "sum")


def _require_reduce(reduce: Any) -> str:
    if not isinstance(reduce, str) or reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(map(repr, _REDUCTIONS))}, got {reduce!r}")
    return reduce


def _read_blocks(
    blocks: Sequence[nn.Module], patch_layers: int, cls_index: int | None, reduce: str = "mean"
) -> tuple[_Recorder, list[int]]:
    """The recorder for the first ``patch_layers`` blocks (and block ``cls_index``)."""
    read = sorted(set(range(patch_layers)) | ({cls_index} if cls_index is not None else set()))
    names = {i: f"blocks[{i}]" for i in read}
    modules = {i: _attention_module(blocks[i], names[i]) for i in read}
    return _Recorder(modules, names), read


def _maps_from(
    recorder: _Recorder, patch_layers: int, cls_index: int | None, prefix: int, reduce: str = "mean"
) -> AttentionMaps:
    patch_probs = [recorder.result(i) for i in range(patch_layers)]
    cls_probs = recorder.result(cls_index) if cls_index is not None else None
    recorder.check_softmax(patch_probs + ([cls_probs] if cls_probs is not None else []))
    patch = None
    if patch_probs:
        if reduce == "sum":  # head means back to head sums
            patch_probs = [p * recorder.heads[i] for i, p in enumerate(patch_probs)]
        patch = torch.stack(patch_probs).sum(dim=0)[:, prefix:, prefix:]
        if reduce == "mean":
            patch = patch / patch_layers
    cls = cls_probs[:, 0, prefix:] if cls_probs is not None else None
    return AttentionMaps(patch=patch, cls=cls)


@torch.no_grad()
def attention_maps(
    blocks: Sequence[nn.Module],
    tokens: torch.Tensor,
    patch_layers: int = 0,
    cls_from_last: bool = False,
    num_prefix_tokens: int = 1,
    reduce: str = "mean",
) -> AttentionMaps:
    """Runs ``blocks`` on ``tokens`` ([B, P + N, D], P prefix tokens, CLS first) without gradients.

    Args:
        blocks: the encoder's transformer blocks, in order; each runs as ``block(x)``.
        tokens: the full, unmasked sequence (patch embedding + position, prefix tokens prepended).
        patch_layers: average the attention of the first ``patch_layers`` blocks over heads and
            layers and drop the prefix rows/columns -> ``patch`` [B, N, N] (EHM's similarity). 0 skips it.
        cls_from_last: also run every block and return the last block's CLS-to-patch attention,
            heads averaged -> ``cls`` [B, N] (AttnMask's score).
        num_prefix_tokens: P, the CLS (and register) tokens in front of the patches.
        reduce: ``"mean"`` averages heads and layers (EHM's and EPM's papers); ``"sum"`` sums them,
            as the EPM authors' released code does with all blocks of its EMA encoder.

    The probabilities are those the blocks compute (read by a hook, fused attention off for the
    blocks read). Blocks that are all timm ``Block`` / ``ResPostBlock`` with timm's plain
    ``Attention`` (the trainer's MAE, ViT/DeiT/registers/q-k-norm ViTs) run fused instead, the
    probabilities computed in float32 from the q and k each block's kernel gets (module docstring). Blocks that take positions from their model (RoPE, shared relative positions:
    EVA-02, RoPE ViTs, ``vit_srelpos``, BEiT with a shared bias) are refused, since ``block(x)``
    would run them without: use :func:`attention_similarity` on the model for those. The blocks
    run in eval mode for the pass (no dropout), their modes restored after. Bad ``blocks`` /
    ``tokens`` and bad ints raise an error naming them. NaN/Inf in ``tokens`` are not an error
    here: they propagate into the maps, which the caller checks (the trainer's NonFiniteError).

    Cost: ``max(patch_layers, len(blocks) if cls_from_last else 0)`` block forwards on the full
    sequence, the last one stopped right after its softmax.
    """
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ArgumentTypeError(
            f"blocks must be a sequence of ViT blocks (e.g. model.blocks), got {type(blocks).__name__}"
        )
    try:
        blocks = list(blocks)
    except TypeError:
        raise ArgumentTypeError(
            f"blocks must be a sequence of ViT blocks (e.g. model.blocks), got {type(blocks).__name__}"
        ) from None
    patch_layers = _require_int(patch_layers, "patch_layers", minimum=0, maximum=len(blocks),
                                hint=" (at most the number of blocks)")
    num_prefix_tokens = _require_int(num_prefix_tokens, "num_prefix_tokens", minimum=0)
    cls_from_last = _require_bool(cls_from_last, "cls_from_last")
    reduce = _require_reduce(reduce)
    if cls_from_last and num_prefix_tokens < 1:
        raise ValueError("cls_from_last needs a CLS token (num_prefix_tokens >= 1)")
    cls_index = len(blocks) - 1 if cls_from_last else None
    recorder, read = _read_blocks(blocks, patch_layers, cls_index, reduce)
    last = read[-1] if read else -1
    for i in range(last + 1):
        if not callable(blocks[i]):
            raise ArgumentTypeError(f"blocks[{i}] must be a module, got {type(blocks[i]).__name__}")
        _refuse_model_level_inputs(blocks[i], f"blocks[{i}]")
    _check_tokens(tokens, "tokens", blocks[0] if blocks else nn.Module(), min_tokens=num_prefix_tokens + 1)
    if not read:
        return AttentionMaps(patch=None, cls=None)
    run = nn.ModuleList(blocks[: last + 1])
    if _fusable(run):
        _PATH_CALLS["fused"] += 1
        reader = _FusedReader(recorder.modules, patch_layers, cls_index, num_prefix_tokens, reduce)
        with _eval_mode(run), reader.attached():
            x = tokens
            for block in run:
                x = block(x)
        return reader.maps()
    _PATH_CALLS["hook"] += 1
    with _eval_mode(run), recorder.attached():
        x = tokens
        for block in run:
            x = block(x)
    return _maps_from(recorder, patch_layers, cls_index, num_prefix_tokens, reduce)


def _model_layout(model: Any) -> str:
    """"timm" (a timm ViT: ``forward_features`` and ``num_prefix_tokens``) or "mae" (the layout of
    facebookresearch/mae's ``MaskedAutoencoderViT``: ``cls_token`` and a ``pos_embed`` with a CLS
    row, added as its ``forward_encoder`` does); a TypeError naming what is missing otherwise."""
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"model must be a timm VisionTransformer-family model or an MAE-layout ViT, got {name}"
        )
    missing = [attr for attr in ("patch_embed", "blocks") if not hasattr(model, attr)]
    if missing:
        raise ArgumentTypeError(
            f"model must be a timm VisionTransformer-family model or an MAE-layout ViT; {name} has no "
            f"{' and no '.join(missing)}"
        )
    if hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens"):
        return "timm"
    missing = [attr for attr in ("cls_token", "pos_embed") if not isinstance(getattr(model, attr, None), torch.Tensor)]
    if missing:
        raise ArgumentTypeError(
            f"model must be a timm VisionTransformer-family model (forward_features, num_prefix_tokens) or an "
            f"MAE-layout ViT (cls_token, pos_embed); {name} has neither forward_features with num_prefix_tokens "
            f"nor {' and '.join(missing)}, so where its CLS and position embeddings go is unknown"
        )
    return "mae"


def _check_images(model: nn.Module, images: Any) -> None:
    _require_tensor(images, "images")
    if images.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {list(images.shape)}")
    _require_floating(images, "images")
    embed = model.patch_embed
    channels = getattr(getattr(embed, "proj", None), "in_channels", None)
    if isinstance(channels, int) and images.shape[1] != channels:
        raise ValueError(f"images must have C = {channels} channels (the model's), got shape {list(images.shape)}")
    size = getattr(embed, "img_size", None)
    strict = getattr(embed, "strict_img_size", True) and not getattr(embed, "dynamic_img_size", False)
    if strict and size is not None and tuple(images.shape[2:]) != tuple(size):
        raise ValueError(f"images must be {tuple(size)} pixels (the model's img_size), got shape {list(images.shape)}")
    device = _module_device(model)
    if device is not None:
        _require_same_device(images, "images", device, "the model's parameters")
    _require_finite(images, "images")


def _mae_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MAE's ``forward_encoder`` up to the blocks, without its random masking."""
    x = model.patch_embed(images)
    pos = model.pos_embed
    if pos.dim() != 3 or pos.shape[1] != x.shape[1] + 1:
        raise ArgumentTypeError(
            f"{type(model).__name__}.pos_embed must hold a CLS row and one row per patch "
            f"([1, {x.shape[1] + 1}, D], MAE's layout), got {list(pos.shape)}"
        )
    x = x + pos[:, 1:, :]
    cls = (model.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


@torch.no_grad()
def attention_similarity(
    model: nn.Module, images: torch.Tensor, layers: int | None = None, reduce: str = "mean"
) -> torch.Tensor:
    """Head- and layer-averaged patch attention ``[B, N, N]`` of a ViT's first ``layers`` blocks
    (CLS and register tokens dropped): the similarity EHM/EPM mask from (EHM Sec. V-E).

    Supported models:

    - timm ViT families (``VisionTransformer`` incl. post-norm/``ResPostBlock``, parallel-scaling
      and register variants, DeiT, ``VisionTransformerRelPos`` incl. shared relative positions,
      ``Eva`` incl. EVA-02 and RoPE ViTs, BEiT): the model's own ``forward_features`` runs, so
      every position embedding, bias and RoPE is the model's; prefix tokens from
      ``num_prefix_tokens``.
    - The layout of facebookresearch/mae's ``MaskedAutoencoderViT`` (and evomask's trainer):
      ``patch_embed``, then ``+ pos_embed[:, 1:]``, ``cls_token + pos_embed[:, :1]`` prepended, then
      ``blocks`` — its ``forward_encoder`` without the random masking.

    Anything else, and blocks whose attention is not one readable softmax (parallel or
    differential attention, talking heads, windows), raise a TypeError naming the model or block
    and the reason. The pass runs in eval mode (no dropout or drop path; modes restored after),
    without gradients, with fused attention off only in the blocks read, and stops right after
    the last softmax needed: about ``layers / depth`` of an encoder forward. ``layers`` defaults
    to half the depth. ``reduce="sum"`` sums heads and layers instead of averaging them (the EPM
    authors' released code).
    """
    layout = _model_layout(model)
    blocks = model.blocks
    try:
        depth = len(blocks)
    except TypeError:
        raise ArgumentTypeError(f"model.blocks must be a sequence of blocks, got {type(blocks).__name__}") from None
    _check_images(model, images)
    layers = depth // 2 if layers is None else layers
    layers = _require_int(layers, "layers", minimum=1, maximum=depth)
    reduce = _require_reduce(reduce)
    recorder, _ = _read_blocks(list(blocks), layers, None, reduce)
    with _eval_mode(model):
        if layout == "timm":
            prefix = int(model.num_prefix_tokens)
            with recorder.attached():
                model.forward_features(images)
        else:
            prefix = 1
            tokens = _mae_tokens(model, images)
            with recorder.attached():
                x = tokens
                for block in blocks:
                    x = block(x)
    for i in range(layers):
        if i not in recorder.probs:
            raise ArgumentTypeError(
                f"{type(model).__name__}'s forward did not run model.blocks[{i}]'s attention: its blocks are "
                "not run in order by forward_features, so this model is not supported"
            )
    return _maps_from(recorder, layers, None, prefix, reduce).patch
