"""A GPT-style decoder that takes its norm by registry name.

Pre-norm blocks (Radford et al. 2019; nanoGPT's layout): ``x + attn(norm1(x))``,
``x + mlp(norm2(x))``, then a final norm and the language-model head (tied to the
token embedding by default). Every norm is ``normjax.make_norm(norm,
causal=causal, **norm_kwargs)``: in the default ``causal='cumulative'`` a
batch-statistics norm pools over (batch, positions <= t) — cumulative statistics —
so that no
logit at position t depends on a token after t, in training as in evaluation,
and the running statistics of the norms that normalize with batch statistics
(batch norm, ghost batches, batch renorm, BLN, batch group norm; and population
and mix norm) are per position (``max_len`` rows: position t is evaluated with
the population statistics of what training normalized position t with, so a
single sequence evaluates as a batch does; PowerNorm and the prior norm, which
train on their running statistics, keep one row);
``causal='per_position'`` or ``'running'`` pick the other causal modes of
:func:`normjax.functional.batch_moments`, and ``causal=False`` pools over the whole
sequence (it leaks the future: for experiments that show it).

The padding ``mask`` (B, L) keeps pad positions out of attention (as keys) and
out of every norm's statistics; their own outputs are finite but meaningless.

    model = Transformer(vocab_size=65, num_layers=4, num_heads=4, d_model=128,
                        max_len=64, norm='batch')
    variables = model.init(key, tokens_BxL)
    logits, updates = model.apply(variables, tokens_BxL, train=True,
                                  mutable=['batch_stats'], rngs={'dropout': key})
    logits = model.apply(variables, tokens_BxL)            # evaluation
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax.functional.causal import Causal
from normjax.models.common import norm_layer

Array = jax.Array

_INIT_STD = 0.02


def _dense(features: int, std: float, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, position t attending to valid keys <= t."""

    num_heads: int
    dropout_rate: float = 0.0
    out_std: float = _INIT_STD

    @nn.compact
    def __call__(self, x_BxLxD: Array, valid_BxL: Array, train: bool) -> Array:
        b, length, d = x_BxLxD.shape
        h = self.num_heads
        qkv = _dense(3 * d, _INIT_STD, "qkv")(x_BxLxD)
        q, k, v = jnp.split(qkv.reshape(b, length, 3, h, d // h), 3, axis=2)
        q, k, v = (t[:, :, 0] for t in (q, k, v))  # (B, L, H, Dh)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        logits = logits / math.sqrt(d // h)
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
        allowed = allowed & valid_BxL[:, None, None, :]
        # A large finite fill (not -inf): a row with no allowed key (a pad query
        # before any valid token) gives finite, ignored outputs instead of NaN.
        logits = jnp.where(allowed, logits, -1e30)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d)
        return _dense(d, self.out_std, "proj")(y)


class Block(nn.Module):
    """Pre-norm decoder block: attention then MLP, each on a residual branch."""

    num_heads: int
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    norm: str = "layer"
    norm_kwargs: Mapping[str, Any] | None = None
    causal: Causal = "cumulative"
    out_std: float = _INIT_STD
    max_len: int | None = None

    @nn.compact
    def __call__(self, x_BxLxD: Array, valid_BxL: Array, train: bool) -> Array:
        d = x_BxLxD.shape[-1]
        mask = valid_BxL[..., None]

        def norm(name: str) -> nn.Module:
            return norm_layer(
                self.norm,
                self.norm_kwargs,
                causal=self.causal,
                max_len=self.max_len,
                name=name,
            )

        drop = nn.Dropout(self.dropout_rate)
        h = norm("norm1")(x_BxLxD, use_running_average=not train, mask=mask)
        h = CausalSelfAttention(
            self.num_heads, self.dropout_rate, self.out_std, name="attn"
        )(h, valid_BxL, train)
        x = x_BxLxD + drop(h, deterministic=not train)
        h = norm("norm2")(x, use_running_average=not train, mask=mask)
        h = _dense(self.mlp_ratio * d, _INIT_STD, "fc")(h)
        h = _dense(d, self.out_std, "fc_proj")(nn.gelu(h))
        return x + drop(h, deterministic=not train)


class Transformer(nn.Module):
    """Decoder-only language model.

    Attributes:
      vocab_size, num_layers, num_heads, d_model, max_len: the usual sizes
        (``d_model`` divisible by ``num_heads``; sequences up to ``max_len``).
      norm, norm_kwargs: the registry name of every norm (two per block and the
        final one) and overrides for it.
      causal: the norms' causal mode ('cumulative' batch statistics by default;
        see the module docstring). Per-token norms (layer, RMS) are causal in
        'cumulative' mode as they are; a mode a norm does not support is refused.
      mlp_ratio, dropout_rate, tie_embeddings: as in GPT-2 / nanoGPT.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    d_model: int
    max_len: int
    norm: str = "layer"
    norm_kwargs: Mapping[str, Any] | None = None
    causal: Causal = "cumulative"
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    tie_embeddings: bool = True

    @nn.compact
    def __call__(
        self, tokens_BxL: Array, train: bool = False, mask: Array | None = None
    ) -> Array:
        """Logits (B, L, vocab_size), float32. ``mask`` (B, L) bool marks the
        valid (non-pad) positions; None means all valid. Token ids must be in
        [0, vocab_size) (out-of-range ids are clipped, as jnp indexing does)."""
        if tokens_BxL.ndim != 2:
            raise ValueError(
                f"tokens must be (batch, length), got shape {tokens_BxL.shape}."
            )
        b, length = tokens_BxL.shape
        if length > self.max_len:
            raise ValueError(
                f"sequence length {length} exceeds max_len={self.max_len}; crop the "
                "input or build the model with a larger max_len."
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads="
                f"{self.num_heads}."
            )
        valid = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
        if valid.shape != (b, length):
            raise ValueError(
                f"mask shape {valid.shape} does not match tokens {tokens_BxL.shape}."
            )
        embed = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=nn.initializers.normal(_INIT_STD),
            name="wte",
        )
        positions = self.param(
            "wpe", nn.initializers.normal(_INIT_STD), (self.max_len, self.d_model)
        )
        x = embed(tokens_BxL) + positions[:length]
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        # GPT-2: residual projections scaled by 1/sqrt(2 * num_layers).
        out_std = _INIT_STD / math.sqrt(2 * self.num_layers)
        for i in range(self.num_layers):
            x = Block(
                self.num_heads,
                self.mlp_ratio,
                self.dropout_rate,
                self.norm,
                self.norm_kwargs,
                self.causal,
                out_std,
                self.max_len,
                name=f"block{i}",
            )(x, valid, train)
        x = norm_layer(
            self.norm,
            self.norm_kwargs,
            causal=self.causal,
            max_len=self.max_len,
            name="norm_f",
        )(x, use_running_average=not train, mask=valid[..., None])
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(self.vocab_size, _INIT_STD, "lm_head")(x)
        return logits.astype(jnp.float32)
