"""Target I/O: how the engine talks to one Hugging Face causal LM, and one forward of it over
its KV cache. The engine (falcon_ext.engine.generate), tree tuning's verify timer, the divergence check
and the benchmarks all run the target through ``forward``."""
from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TargetIO:
    """How to talk to this particular HF model."""

    model: torch.nn.Module
    input_device: torch.device
    cache_kwarg: str  # "cache" (transformers >= 5.2x) or "past_key_values"
    dtype: torch.dtype
    vocab_size: int  # rows of the LM head: the ids the target can read and emit
    max_positions: int | None
    # fp32_lm_head: the LM head's weight and bias in float32; the engine then computes the logits
    # from the target's features itself, and the model's own head runs on no rows at all.
    head32: tuple[torch.Tensor, torch.Tensor | None] | None = None


def for_model(model, fp32_lm_head: bool = False) -> TargetIO:
    """The model's ``TargetIO``; with ``fp32_lm_head`` the engine computes float32 logits itself."""
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    embeddings = model.get_input_embeddings()
    return TargetIO(
        model=model,
        input_device=embeddings.weight.device,
        cache_kwarg=cache_kwarg,
        dtype=embeddings.weight.dtype,
        vocab_size=min(embeddings.weight.shape[0], getattr(model.config, "vocab_size", None) or embeddings.weight.shape[0]),
        max_positions=getattr(model.config, "max_position_embeddings", None),
        head32=_head32(model, params) if fp32_lm_head else None,
    )


def _head32(model, forward_params) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "logits_to_keep" not in forward_params:
        raise ValueError(f"fp32_lm_head needs a model whose forward takes logits_to_keep; "
                         f"{type(model).__name__} does not")
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight.detach().float(), None if bias is None else bias.detach().float()


# logits_to_keep as an empty index: the model's own LM head then runs on zero rows.
_NO_LOGITS = torch.empty(0, dtype=torch.int64)


def forward(io: TargetIO, input_ids, cache, *, need_features, **kwargs):
    """Logits [T, V] (float32 with io.head32) and, if asked or needed, the features [T, H]: one row."""
    logits, features = forward_rows(io, input_ids, cache, need_features=need_features, **kwargs)
    return logits[0], None if features is None else features[0]


def forward_rows(io: TargetIO, input_ids, cache, *, need_features, **kwargs):
    """:func:`forward` for a batch: logits [B, T, V] and, if asked or needed, features [B, T, H]."""
    if io.head32 is not None:
        kwargs["logits_to_keep"] = _NO_LOGITS.to(input_ids.device)
    out = io.model(
        input_ids=input_ids,
        use_cache=True,
        output_hidden_states=need_features or io.head32 is not None,
        return_dict=True,
        **{io.cache_kwarg: cache},
        **kwargs,
    )
    features = out.hidden_states[-1] if need_features or io.head32 is not None else None
    if io.head32 is None:
        return out.logits, features
    weight, bias = io.head32
    logits = F.linear(features.to(weight.device, torch.float32), weight, bias)
    return logits, features if need_features else None


@contextmanager
def grouped_kv_attention(device: torch.device):
    """On CPU, let SDPA read grouped-query KV heads as they are cached while a tree is verified.

    With a custom mask and more than one query, transformers' SDPA path copies every layer's
    cached keys and values once per query-head group (``repeat_kv``): a copy of the whole cache
    at each step, so the step grows with the position faster than a one-token step does
    (RESULTS.md, "Step time against position"). PyTorch's CPU SDPA takes the grouped heads and
    a mask directly (``enable_gqa``); transformers uses that when TRANSFORMERS_SDPA_FORCE_GQA=1,
    read at each attention call. The same attention, without the copy. Not on CUDA: there a
    mask with ``enable_gqa`` falls back to the math kernel, slower than the copy.
    """
    if device.type != "cpu":
        yield
        return
    previous = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_GQA]
        else:
            os.environ[_FORCE_GQA] = previous


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"
