"""The linear-attention family: linear attention (plain, RetNet, simple GLA / Mamba2
SSD, GLA) and the (gated) delta rule, with chunked-state recurrences over ``[B, T, H, D]``
inputs, variable-length batches, initial / final states and single-token decoding."""

from .functional import (
    chunked_delta_rule,
    chunked_linear_attention,
    delta_rule,
    delta_rule_step,
    fused_kernels_available,
    linear_attention,
    linear_attention_step,
)
from .modules import GatedDeltaNet, LinearAttention
from .reference import naive_delta_rule, naive_linear_attention

__all__ = [
    "GatedDeltaNet",
    "LinearAttention",
    "chunked_delta_rule",
    "chunked_linear_attention",
    "delta_rule",
    "delta_rule_step",
    "fused_kernels_available",
    "linear_attention",
    "linear_attention_step",
    "naive_delta_rule",
    "naive_linear_attention",
]
