"""Attention with quantized matmul operands, as a diffusers attention processor.

Mirrors diffusers' AttnProcessor2_0 for self- and cross-attention, but computes attention as two explicit
matmuls so that both operands of each can be quantized: (Q, K) for QK^T and (softmax(QK^T), V) for the
weighted sum. The projections to_q/to_k/to_v/to_out are Linear layers and are quantized as such.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq4dm.quant.quantizer import Quantizer, QuantSpec


class QuantAttnProcessor(nn.Module):
    OPERANDS = ("query", "key", "probs", "value")

    def __init__(self, activation: QuantSpec):
        super().__init__()
        self.quantizers = nn.ModuleDict({name: Quantizer(activation) for name in self.OPERANDS})

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        q = self.quantizers
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = torch.matmul(q["query"](query), q["key"](key).transpose(-1, -2)) * (head_dim**-0.5)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1).to(value.dtype)  # softmax stays full precision
        hidden_states = torch.matmul(q["probs"](probs), q["value"](value))

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states.to(query.dtype))
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
