"""Fast CPU convolution and 2x2 max-pooling behind ``flax.linen``'s interfaces.

XLA:CPU computes a convolution's kernel gradient as another convolution that
contracts over the batch: at our CIFAR shapes 2.5-5x slower than the forward.
``Conv`` keeps XLA's forward and input gradient and computes the kernel gradient
as matmuls over chunks of the batch (a custom VJP): forward+backward 1.0-1.6x
faster than ``flax.linen.Conv``. ``max_pool_2x2`` takes the maximum of four
strided slices and scatters its gradient with a mask instead of XLA's
select-and-scatter: forward+backward 8-11x faster than ``flax.linen.max_pool``.
Together they make a FastCNN train step 1.8x faster on 2 CPU cores. Both give
Flax's results to float32 rounding (pooling exactly, gradient included) and keep
its variables. Measured with ``python -m benchmarks.conv``.

They are for XLA:CPU: :func:`backend_layers` gives the models these on the CPU
backend and ``flax.linen.Conv`` / ``max_pool`` (native kernels) on GPU and TPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding, default_kernel_init
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike
from jax import lax

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Batch chunk of the kernel gradient: about this many bytes of im2col columns
# per chunk, so that each chunk's slices stay in cache (measured best of 1-16 MiB).
_CHUNK_BYTES = 8 << 20
# From this many input channels one im2col matmul per chunk beat kh*kw matmuls
# (one per kernel tap); below it, concatenating narrow slices costs more.
_IM2COL_MIN_CHANNELS = 64


def conv_padding(
    in_hw: Sequence[int],
    kernel_hw: Sequence[int],
    strides: Sequence[int],
    padding: PaddingLike,
) -> Pads:
    """Explicit ((lo, hi), (lo, hi)) spatial padding, as ``flax.linen.Conv`` and
    ``lax.conv_general_dilated`` read 'SAME', 'VALID', an int or int pairs."""
    padding = canonicalize_padding(padding, 2)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise NotImplementedError(
                f"padding {padding!r}: use 'SAME', 'VALID' or explicit pairs."
            )
        padding = lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    for (lo, hi), k in zip(pads, kernel_hw, strict=True):
        if not (0 <= lo < k and 0 <= hi < k):
            raise NotImplementedError(
                f"padding {pads} for kernel {tuple(kernel_hw)}: each side must "
                "be in [0, kernel size)."
            )
    return pads  # type: ignore[return-value]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(
    x_NxHxWxC: Array,
    kernel_KHxKWxCxO: Array,
    strides: tuple[int, int],
    pads: Pads,
    precision: PrecisionLike = None,
) -> Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO) with the fast kernel gradient.

    Returns y_NxH'xW'xO. ``pads`` is explicit (see ``conv_padding``). Forward and
    input gradient are XLA's convolutions; the kernel gradient is im2col(x)^T @ dy
    over chunks of the batch. Reverse mode only (no ``jax.jvp``).
    """
    return lax.conv_general_dilated(
        x_NxHxWxC,
        kernel_KHxKWxCxO,
        strides,
        pads,
        dimension_numbers=_DIMENSION_NUMBERS,
        precision=precision,
    )


def _conv2d_fwd(
    x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, precision: Any
) -> tuple[Array, tuple[Array, Array]]:
    return conv2d(x, kernel, strides, pads, precision), (x, kernel)


def _conv2d_bwd(
    strides: tuple[int, int],
    pads: Pads,
    precision: Any,
    residuals: tuple[Array, Array],
    dy: Array,
) -> tuple[Array, Array]:
    x, kernel = residuals
    dx = _input_grad(dy, kernel, x.shape, strides, pads, precision)
    dkernel = _kernel_grad(x, dy, kernel.shape, strides, pads, precision)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _input_grad(
    dy_NxHoxWoxO: Array,
    kernel: Array,
    x_shape: Sequence[int],
    strides: tuple[int, int],
    pads: Pads,
    precision: Any,
) -> Array:
    """dx: dy (dilated by the strides) convolved with the flipped kernel.

    The kernel is flipped and transposed to HWIO in memory: XLA's own transpose
    leaves it HWOI, which measured up to 1.5x slower."""
    transposed_pads = []
    for n, k, s, (lo, _), m in zip(
        x_shape[1:3],
        kernel.shape[:2],
        strides,
        pads,
        dy_NxHoxWoxO.shape[1:3],
        strict=True,
    ):
        before = k - 1 - lo
        after = n + k - 1 - ((m - 1) * s + 1) - before
        transposed_pads.append((before, after))
    return lax.conv_general_dilated(
        dy_NxHoxWoxO,
        jnp.flip(kernel, (0, 1)).swapaxes(2, 3),
        (1, 1),
        transposed_pads,
        lhs_dilation=strides,
        dimension_numbers=_DIMENSION_NUMBERS,
        precision=precision,
    )


def _batch_chunk(n: int, bytes_per_image: int) -> int:
    """Images per kernel-gradient chunk: a divisor of n near the byte budget."""
    target = max(1, min(n, _CHUNK_BYTES // max(bytes_per_image, 1)))
    divisor = max(d for d in range(1, target + 1) if n % d == 0)
    return divisor if 2 * divisor >= target else target  # else pad the batch


def _kernel_grad(
    x_NxHxWxC: Array,
    dy_NxHoxWoxO: Array,
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    pads: Pads,
    precision: Any,
) -> Array:
    """dW[i, j] = sum over (n, h, w) of x_pad[n, s*h + i, s*w + j]^T dy[n, h, w].

    One matmul per kernel tap (or one im2col matmul for wide inputs) per chunk
    of the batch, summed over chunks in float32 or wider.
    """
    kh, kw, cin, cout = kernel_shape
    n, ho, wo = dy_NxHoxWoxO.shape[:3]
    (sh, sw) = strides
    acc_dtype = jnp.promote_types(x_NxHxWxC.dtype, jnp.float32)
    chunk = _batch_chunk(n, ho * wo * kh * kw * cin * x_NxHxWxC.dtype.itemsize)
    groups = -(-n // chunk)
    x, dy = x_NxHxWxC, dy_NxHoxWoxO
    if groups * chunk != n:  # zero images add nothing to the gradient.
        extra = ((0, groups * chunk - n), (0, 0), (0, 0), (0, 0))
        x, dy = jnp.pad(x, extra), jnp.pad(dy, extra)

    def chunk_grad(x_BxHxWxC: Array, dy_BxHoxWoxO: Array) -> Array:
        x_pad = jnp.pad(x_BxHxWxC, ((0, 0), pads[0], pads[1], (0, 0)))
        taps = [
            x_pad[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        dy_RxO = dy_BxHoxWoxO.reshape(-1, cout)

        def contract(a_RxK: Array) -> Array:
            return lax.dot_general(
                a_RxK,
                dy_RxO,
                (((0,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=acc_dtype,
            )

        if cin >= _IM2COL_MIN_CHANNELS:
            return contract(jnp.concatenate(taps, -1).reshape(-1, kh * kw * cin))
        return jnp.concatenate([contract(t.reshape(-1, cin)) for t in taps], 0)

    if groups == 1:
        grad = chunk_grad(x, dy)
    else:
        xs = x.reshape(groups, chunk, *x.shape[1:])
        dys = dy.reshape(groups, chunk, *dy.shape[1:])
        grad = lax.scan(
            lambda acc, xy: (acc + chunk_grad(*xy), None),
            jnp.zeros((kh * kw * cin, cout), acc_dtype),
            (xs, dys),
        )[0]
    return grad.reshape(kh, kw, cin, cout)


class Conv(nn.Module):
    """2-D convolution with ``flax.linen.Conv``'s arguments and variables.

    Params ``kernel`` (KH, KW, C, features) and ``bias`` (features,), created as
    Flax creates them (same initializers, same values from the same key). Inputs
    are NHWC; ``kernel_size`` an int means a square kernel (Flax reads an int as a
    1-D kernel). Padding: 'SAME', 'VALID', an int or (lo, hi) pairs with each
    side smaller than the kernel. No dilation, groups or masks.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs_NxHxWxC: Array) -> Array:
        if inputs_NxHxWxC.ndim != 4:
            raise ValueError(
                f"Conv takes NHWC inputs, got shape {inputs_NxHxWxC.shape}."
            )
        kernel_hw = _pair(self.kernel_size)
        strides = _pair(self.strides)
        pads = conv_padding(inputs_NxHxWxC.shape[1:3], kernel_hw, strides, self.padding)
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_hw, inputs_NxHxWxC.shape[-1], self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", self.bias_init, (self.features,), self.param_dtype
            )
        x, kernel, bias = nn.dtypes.promote_dtype(
            inputs_NxHxWxC, kernel, bias, dtype=self.dtype
        )
        y = conv2d(x, kernel, strides, pads, self.precision)
        return y if bias is None else y + bias


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"expected an int or two ints, got {value!r}.")
    return (int(pair[0]), int(pair[1]))


def _crop_even(x_NxHxWxC: Array) -> Array:
    """Drops a last odd row/column, as a VALID 2x2 stride-2 pool does."""
    _, h, w, _ = x_NxHxWxC.shape
    return x_NxHxWxC[:, : h - h % 2, : w - w % 2]


def _window_corners(x_NxHxWxC: Array) -> list[Array]:
    """The four elements of every 2x2 window, in row-major window order."""
    x = _crop_even(x_NxHxWxC)
    return [x[:, a::2, b::2] for a in (0, 1) for b in (0, 1)]


@jax.custom_vjp
def max_pool_2x2(x_NxHxWxC: Array) -> Array:
    """``flax.linen.max_pool(x, (2, 2), strides=(2, 2))``: y_Nx(H//2)x(W//2)xC.

    The maximum of four strided slices. Its gradient is Flax's exactly: each
    window's gradient goes to its first maximum in row-major order (a valid
    subgradient of max; ``jnp.maximum``'s autodiff would split ties evenly).
    An odd last row or column is dropped (VALID) and gets zero gradient; a NaN
    window propagates NaN and passes no gradient.
    """
    a, b, c, d = _window_corners(x_NxHxWxC)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(residuals: tuple[Array, Array], dy: Array) -> tuple[Array]:
    x, y = residuals
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    # Which corner took each window's maximum: its first, in row-major order;
    # 4 where none did (a NaN window passes no gradient).
    winner = jnp.full(y.shape, 4, jnp.int8)
    for k, corner in reversed(list(enumerate(_window_corners(x)))):
        winner = jnp.where(corner == y, jnp.int8(k), winner)

    # One elementwise pass over the (cropped) input: each element takes its
    # window's gradient where it is the window's winner. Window values are
    # broadcast over their 2x2 block (no stacks or concatenations, which XLA
    # emits once per operand inside a fusion).
    def up(v: Array) -> Array:
        v = jnp.broadcast_to(v[:, :, None, :, None], (n, h2, 2, w2, 2, c))
        return v.reshape(n, 2 * h2, 2 * w2, c)

    block = (1, h2, 2, w2, 2, 1)
    corner = 2 * lax.broadcasted_iota(jnp.int8, block, 2) + lax.broadcasted_iota(
        jnp.int8, block, 4
    )
    corner = corner.reshape(1, 2 * h2, 2 * w2, 1)
    dx = jnp.where(up(winner) == corner, up(dy), jnp.zeros((), dy.dtype))
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def flax_max_pool_2x2(x_NxHxWxC: Array) -> Array:
    """``flax.linen.max_pool`` over 2x2 windows with stride 2 (VALID)."""
    return nn.max_pool(x_NxHxWxC, (2, 2), strides=(2, 2))


LAYERS = ("auto", "fast", "flax")


def backend_layers(
    conv: Callable[..., nn.Module] | None = None,
    pool: Callable[[Array], Array] | None = None,
    *,
    layers: str = "auto",
) -> tuple[Callable[..., nn.Module], Callable[[Array], Array]]:
    """The convolution module and 2x2 max-pool a model uses; given ones are kept.

    ``layers``: 'fast' (:class:`Conv`, :func:`max_pool_2x2`), 'flax'
    (``flax.linen.Conv``, ``flax.linen.max_pool``), or 'auto': 'fast' on the CPU
    backend (``jax.default_backend() == 'cpu'``), 'flax' on GPU and TPU, whose
    native kernels are what those users expect.
    """
    if layers not in LAYERS:
        raise ValueError(f"layers={layers!r}: use one of {', '.join(LAYERS)}.")
    if layers == "auto":
        layers = "fast" if jax.default_backend() == "cpu" else "flax"
    if layers == "fast":
        return conv or Conv, pool or max_pool_2x2
    return conv or nn.Conv, pool or flax_max_pool_2x2


class WeightNormConv(nn.Module):
    """A convolution with weight normalization (Salimans & Kingma 2016): each
    output channel's kernel is ``scale * v / ||v||``, through
    ``flax.linen.WeightNorm`` around ``conv(features, kernel_size)`` (``conv``
    with its other options bound, see :func:`weight_normed`). Variables:
    ``weight_norm/layer_instance/kernel`` (v) and its ``.../scale`` (ones at
    init: the kernel's per-channel norm starts at 1, as LeCun-normal init gives
    in expectation)."""

    conv: Callable[..., nn.Module]
    features: int
    kernel_size: Sequence[int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        layer = self.conv(self.features, self.kernel_size, parent=None)
        return nn.WeightNorm(layer, name="weight_norm")(x)


def weight_normed(conv: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``conv`` (a convolution module class, as a model's ``conv=`` takes it)
    with weight normalization on every layer it makes; every other option
    (``use_bias``, ``strides``, ``padding``, ``kernel_init``, ...) goes to
    ``conv``."""

    def make(
        features: int,
        kernel_size: Sequence[int],
        *,
        name: str | None = None,
        **options: Any,
    ) -> nn.Module:
        bound = functools.partial(conv, **options) if options else conv
        return WeightNormConv(bound, features, kernel_size, name=name)

    return make
