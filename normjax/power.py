"""PowerNorm (Shen et al. 2020, arXiv:2003.07845) as pure functions. No Flax import.

PowerNorm is batch norm for transformers with three changes:

  1. relaxed zero-mean: no centring; each feature channel is scaled by its
     quadratic mean psi, psi_B^2 = mean(x^2) over every other axis;
  2. the forward pass in training divides by the *running* psi_{t-1}, not the
     batch's, so one odd batch cannot jerk the activations;
  3. an approximate backward pass (Algorithm 2) that replaces the batch term of
     the exact gradient by a running estimate nu, one per channel.

Algorithm 2 (Every Iteration), per channel, with alpha the momentum (Flax's
convention: the fraction of the old value kept) and statistics over the valid
(unmasked) elements::

    forward   x_hat = x / psi_{t-1}          psi_{t-1} = sqrt(psi2_{t-1} + eps)
              y = gamma * x_hat + beta
              psi2_t = alpha * psi2_{t-1} + (1 - alpha) * mean(x^2)
    backward  g = gamma * dL/dy                                (= dL/dx_hat)
              Gamma = mean(x_hat^2)      Lambda = mean(g * x_hat)
              dL/dx = (g - nu_{t-1} * x_hat) / psi_{t-1}
              nu_t  = nu_{t-1} * (1 - (1 - alpha) Gamma) + (1 - alpha) Lambda
    eval      y = gamma * x / psi + beta

The gradients of gamma and beta are the ordinary ones (sum of dL/dy * x_hat and
of dL/dy). The authors' code (sIncerass/powernorm,
fairseq/modules/norms/mask_powernorm.py) keeps ``ema_gz`` = nu / (1 - alpha)
and writes the same update as ``ema_gz += mean((g - (1 - alpha) ema_gz x_hat)
x_hat)``; the two are equal.

**nu through a side channel.** nu_t is known only in the backward pass and JAX
functions do not mutate state. The custom VJP therefore takes nu as an input and
returns, as nu's cotangent, the *increment* ``nu_t - nu_{t-1} = (1 - alpha)
(Lambda - nu_{t-1} Gamma)``. Differentiate the loss w.r.t. nu (the Flax module
routes it through ``Module.perturb``) and add the result to the stored nu
(:func:`apply_nu_updates`). An increment rather than the new value because
cotangents add: a layer applied twice in one step, or gradients pmean-ed over
devices, then give a sensible update instead of a multiple of nu. Note that the
increment is affine, not linear, in dL/dy (the ``-nu Gamma`` term does not scale
with the loss). Without that extra gradient the forward and the x, gamma, beta
gradients are unchanged and nu simply stays at its value. With ``axis_name``,
Gamma and Lambda are pooled over the devices, so every device returns the same
increment: average (pmean) it like the other gradients, do not sum it.

Departures from the paper and the authors' code, each deliberate:

* the backward divides by the running psi_{t-1} as Algorithm 2 says; the
  authors' code divides by the *batch* sqrt(psi_B^2 + eps) after warm-up;
* Gamma and Lambda are means over valid elements only (the code averages over
  padded positions too); padded elements get dL/dx = g / psi (no nu term, as
  they do not enter the statistics);
* warm-up (the code's ``warmup_iters``; not in the paper): the first
  ``warmup_steps`` training steps divide by the batch psi_B (falling back to the
  running psi where a slot has no valid element). By default the gradient is
  the exact autodiff gradient of that forward (``warmup_gradient='exact'``);
  the code instead uses the approximate backward with psi_B held constant
  (``warmup_gradient='approximate'``). nu is updated in both cases so it is warm
  at the switch. During warm-up the running psi2 is the plain mean of the
  warm-up batches' psi_B^2 (the code's cumulative average, without the EMA it
  stacks on top of it), which removes the bias of the initial value 1;
* the code's ``GroupScaling1D`` (each token divided by its RMS over channels
  before PowerNorm) is not part of Algorithm 2 and is left out; compose with
  ``functional.rms_norm(x)`` if wanted;
* ``nu_momentum`` may differ from ``momentum`` (the code's ``alpha_bkw`` /
  ``alpha_fwd``); by default they are equal, as in Algorithm 2.

``variant='pn-v'`` is the paper's PN-V: the batch quadratic mean in the forward,
the exact gradient, no nu.

Causal modes (sequences (B, L, D), ``functional.CAUSAL_MODES``): only a batch
psi_B used in the forward (warm-up, PN-V) can leak later tokens into earlier
positions. ``causal=True`` / ``'cumulative'`` makes it cumulative over (batch,
positions <= t); ``'per_position'`` takes it per position across the batch;
``'running'`` never uses it (the running psi always, PN-V included). The
running-psi forward is causal by construction; the running-psi2 and nu updates use
the whole batch (they only affect later steps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional import (
    affine,
    batch_moments,
    broadcast_mask,
    causal_mode,
    feature_layout,
    standardize,
)
from normjax.stats import Axes, Moments

Array = jax.Array
Params = Mapping[str, Array]
State = Mapping[str, Array]

VARIANTS = ("pn", "pn-v")
WARMUP_GRADIENTS = ("exact", "approximate")


# ------------------------------------------------------------ approximate backward


def _power_scale_fn(
    reduction_axes: tuple[int, ...],
    axis_name: Any,
    axis_index_groups: Any,
    nu_momentum: float,
    may_be_exact: bool,
) -> Callable[..., Array]:
    """``x * inv_psi`` whose VJP is Algorithm 2's, with nu's cotangent the nu
    increment. ``exact`` (a 0/1 scalar, traced) switches to the exact gradient
    for ``inv_psi`` computed from the batch (warm-up)."""

    @jax.custom_vjp
    def power_scale(
        x: Array, inv_psi: Array, nu: Array, mask: Array | None, exact: Array
    ) -> Array:
        return x.astype(inv_psi.dtype) * inv_psi

    def forward(x: Array, inv_psi: Array, nu: Array, mask: Any, exact: Array):
        return power_scale(x, inv_psi, nu, mask, exact), (x, inv_psi, nu, mask, exact)

    def backward(residuals: tuple, g_xhat: Array) -> tuple:
        x, inv_psi, nu, mask, exact = residuals
        x_stat = x.astype(inv_psi.dtype)
        x_hat = x_stat * inv_psi
        g_xhat = g_xhat.astype(inv_psi.dtype)
        # Gamma = mean(x_hat^2) and Lambda = mean(g * x_hat) over the whole batch
        # (all devices), valid elements only.
        m = stats.moments(
            x_hat,
            reduction_axes,
            mask=mask,
            center=False,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
        gamma_stat = stats.variance(m)
        weighted = g_xhat * x_hat if mask is None else g_xhat * x_hat * mask
        lambda_sum = jnp.sum(weighted, reduction_axes, keepdims=True)
        if axis_name is not None:
            lambda_sum = jax.lax.psum(
                lambda_sum, axis_name, axis_index_groups=axis_index_groups
            )
        lambda_stat = jnp.where(m.count > 0, lambda_sum / jnp.maximum(m.count, 1), 0)
        nu_increment = (1.0 - nu_momentum) * (lambda_stat - nu * gamma_stat)

        correction = nu * x_hat if mask is None else nu * x_hat * mask
        dx = (g_xhat - (1.0 - exact) * correction) * inv_psi
        if may_be_exact:
            summed = tuple(
                i
                for i, (n, k) in enumerate(zip(x.shape, inv_psi.shape, strict=True))
                if k == 1 and n != 1
            )
            d_inv_psi = exact * jnp.sum(g_xhat * x_stat, summed, keepdims=True)
        else:
            d_inv_psi = jnp.zeros_like(inv_psi)
        return (
            dx.astype(x.dtype),
            d_inv_psi.astype(inv_psi.dtype),
            nu_increment.astype(nu.dtype),
            None,
            jnp.zeros_like(exact),
        )

    power_scale.defvjp(forward, backward)
    return power_scale


# -------------------------------------------------------------------- the transform


def _check_options(
    *,
    variant: str,
    warmup_gradient: str,
    momentum: float,
    nu_momentum: float,
    epsilon: float,
    warmup_steps: int,
) -> None:
    name = "power_norm"
    if variant not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {variant!r}.")
    if warmup_gradient not in WARMUP_GRADIENTS:
        raise ValueError(
            f"{name}: warmup_gradient must be one of {WARMUP_GRADIENTS}, got "
            f"{warmup_gradient!r}."
        )
    for key, value in (("momentum", momentum), ("nu_momentum", nu_momentum)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {key} must lie in [0, 1], got {value}.")
    if epsilon < 0:
        raise ValueError(f"{name}: epsilon must be >= 0, got {epsilon}.")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps:
        raise ValueError(f"{name}: warmup_steps must be an int, got {warmup_steps!r}.")
    if warmup_steps < 0:
        raise ValueError(f"{name}: warmup_steps must be >= 0, got {warmup_steps}.")
    if variant == "pn-v" and warmup_steps:
        raise ValueError(
            f"{name}: warmup_steps applies to variant 'pn' only; PN-V always uses "
            "batch statistics."
        )


def state_keys(variant: str = "pn") -> tuple[str, ...]:
    """Names of the state entries: ``('psi2', 'nu', 'steps')`` for PN, ``('psi2',)``
    for PN-V."""
    return ("psi2", "nu", "steps") if variant == "pn" else ("psi2",)


def init_state(feature_shape: tuple[int, ...], variant: str = "pn") -> dict[str, Array]:
    """Initial state: psi2 = 1 and nu = 0 of ``feature_shape`` (float32), steps = 0
    (int32 scalar), as the authors' code initializes them."""
    state = {"psi2": jnp.ones(feature_shape, jnp.float32)}
    if variant == "pn":
        state["nu"] = jnp.zeros(feature_shape, jnp.float32)
        state["steps"] = jnp.zeros((), jnp.int32)
    return state


def _check_state(state: State, feature_shape: tuple[int, ...], variant: str) -> None:
    name = "power_norm"
    for key in state_keys(variant):
        if key not in state:
            raise ValueError(
                f"{name}: variant {variant!r} needs state keys "
                f"{list(state_keys(variant))}, got {sorted(state)}."
            )
        want = () if key == "steps" else feature_shape
        if tuple(jnp.shape(state[key])) != want:
            raise ValueError(
                f"{name}: state[{key!r}] has shape {tuple(jnp.shape(state[key]))} but "
                f"should have shape {want} (the input's feature shape for psi2 and "
                "nu, a scalar for steps); the state was made for another layer or "
                "input — re-initialize it, or check `axis`."
            )
    steps_dtype = jnp.asarray(state.get("steps", 0)).dtype
    if variant == "pn" and not jnp.issubdtype(steps_dtype, jnp.integer):
        raise ValueError(
            f"{name}: state['steps'] must be an integer scalar, got dtype "
            f"{steps_dtype}."
        )


def power_norm(
    x: Array,
    params: Params | None = None,
    state: State | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    warmup_steps: int = 0,
    variant: str = "pn",
    warmup_gradient: str = "exact",
    nu_momentum: float | None = None,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: bool | str = False,
    time_axis: int = 1,
    dtype: Any = None,
) -> tuple[Array, State | None]:
    """PowerNorm: per-channel quadratic mean over every axis but ``axis``.

    x_BxLxD -> psi2_D; y = x / sqrt(psi2 + eps) * scale_D + bias_D, with psi2 the
    running value ``state['psi2']`` (eval, and training after warm-up), or the
    batch's mean(x^2) (warm-up, PN-V; cumulative over positions <= t along
    ``time_axis`` when ``causal`` is True). Training returns the new state: psi2 the
    running average ``momentum * old + (1 - momentum) * batch`` (the warm-up
    batches' mean during warm-up; unchanged where no element is valid), steps
    + 1, nu unchanged — its update arrives as the cotangent of ``state['nu']``
    (see the module docstring and :func:`apply_nu_updates`).

    Args:
      params: optional ``'scale'`` / ``'bias'`` of the feature shape.
      state: ``{'psi2', 'nu', 'steps'}`` (:func:`init_state`); PN-V needs only
        ``'psi2'`` and may train with ``state=None``.
      variant: ``'pn'`` (running psi forward, Algorithm 2 backward) or ``'pn-v'``
        (batch psi forward, exact gradient).
      warmup_steps: PN only; the first this many training steps use the batch psi.
      warmup_gradient: ``'exact'`` (autodiff through psi_B) or ``'approximate'``
        (Algorithm 2 with psi_B held constant, as the authors' code).
      nu_momentum: alpha of the nu update; None means ``momentum``.
      mask: boolean, broadcastable to ``x``; False elements count 0 everywhere
        (psi, Gamma, Lambda).
      axis_name: pool statistics (and Gamma, Lambda) over this mapped axis.
      causal, time_axis: False, True (= 'cumulative'), 'per_position' or
        'running' (see the module docstring); ``time_axis`` is the sequence axis.

    Returns:
      ``(y, new_state)``; y has ``x``'s dtype unless ``dtype`` is given.
    """
    name = "power_norm"
    nu_momentum = momentum if nu_momentum is None else nu_momentum
    _check_options(
        variant=variant,
        warmup_gradient=warmup_gradient,
        momentum=momentum,
        nu_momentum=nu_momentum,
        epsilon=epsilon,
        warmup_steps=warmup_steps,
    )
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    if not reduction_axes:
        raise ValueError(
            f"{name}: axis={axis!r} covers every axis of an input of shape "
            f"{x.shape}; nothing is left to reduce over."
        )
    mode = causal_mode(causal)
    time = None
    if mode is not None:
        time = stats.canonicalize_axes(x.ndim, time_axis, name=f"{name} time_axis")[0]
        if time in feature_axes:
            raise ValueError(
                f"{name}: time_axis {time} is a feature axis; causal statistics "
                "run along a reduced axis."
            )
    if state is not None:
        _check_state(state, feature_shape, variant)
    elif variant == "pn" or not train or mode == "running":
        raise ValueError(
            f"{name}: variant {variant!r} with train={train} and causal={causal!r} "
            "normalizes with the running psi2, but state is None; pass the "
            "layer's state (power.init_state(feature_shape))."
        )
    stat_dtype = stats.stat_dtype(x.dtype)
    out_dtype = x.dtype if dtype is None else dtype

    running = None  # the running psi2 as uncentred moments
    if state is not None:
        running = Moments(
            jnp.ones(broadcast, stat_dtype),
            jnp.zeros(broadcast, stat_dtype),
            state["psi2"].astype(stat_dtype).reshape(broadcast),
        )

    if not train:
        y = affine(standardize(x, running, epsilon), params, feature_axes, name=name)
        return y.astype(out_dtype), state

    mask = broadcast_mask(mask, x)
    batch_forward = mode != "running" and (variant == "pn-v" or warmup_steps > 0)
    b = batch_moments(
        x,
        feature_axes,
        mask=mask,
        center=False,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal=mode if batch_forward else None,
        time_axis=time_axis,
    )
    batch = b.moments
    batch_psi2 = stats.variance(b.pooled)
    valid = b.pooled.count > 0

    if variant == "pn-v":
        if not batch_forward:  # causal='running'
            batch = running
        y = affine(standardize(x, batch, epsilon), params, feature_axes, name=name)
        if state is None:
            return y.astype(out_dtype), None
        psi2 = state["psi2"]
        new_psi2 = jnp.where(
            valid, stats.ema(psi2.astype(stat_dtype), batch_psi2, momentum), psi2
        )
        return y.astype(out_dtype), {**state, "psi2": new_psi2.astype(psi2.dtype)}

    psi2, nu, steps = state["psi2"], state["nu"], jnp.asarray(state["steps"])
    running_psi2 = jax.lax.stop_gradient(psi2).astype(stat_dtype)
    inv_psi = jax.lax.rsqrt(running_psi2 + epsilon).reshape(broadcast)
    exact = jnp.zeros((), stat_dtype)
    new_running = stats.ema(running_psi2, batch_psi2, momentum)
    may_be_exact = batch_forward and warmup_gradient == "exact"
    if warmup_steps > 0:
        in_warmup = steps < warmup_steps
        if batch_forward:
            inv_batch = jax.lax.rsqrt(stats.variance(batch) + epsilon)
            inv_batch = jnp.where(batch.count > 0, inv_batch, inv_psi)
            inv_psi = jnp.where(in_warmup, inv_batch, inv_psi)
        if may_be_exact:
            exact = in_warmup.astype(stat_dtype)
        warmup_mean = running_psi2 + (batch_psi2 - running_psi2) / (
            steps.astype(stat_dtype) + 1.0
        )
        new_running = jnp.where(in_warmup, warmup_mean, new_running)
    power_scale = _power_scale_fn(
        reduction_axes,
        axis_name,
        axis_index_groups,
        nu_momentum,
        may_be_exact=may_be_exact,
    )
    x_hat = power_scale(
        x, inv_psi, nu.astype(stat_dtype).reshape(broadcast), mask, exact
    )
    y = affine(x_hat, params, feature_axes, name=name)
    new_state = {
        **state,
        "psi2": jnp.where(valid, new_running, running_psi2).astype(psi2.dtype),
        "steps": steps + 1,
    }
    return y.astype(out_dtype), new_state


# ------------------------------------------------------------------- nu side channel


def apply_nu_updates(
    batch_stats: Mapping[str, Any], perturbation_grads: Mapping[str, Any]
) -> dict[str, Any]:
    """Adds the nu increments to every PowerNorm's ``nu`` in a batch_stats tree.

    ``perturbation_grads`` is the gradient of the loss w.r.t. the
    ``'perturbations'`` collection (or, for the functional API, ``{'nu': dnu}``
    next to a state ``{'psi2', 'nu', 'steps'}``). A leaf ``nu`` whose path in
    ``batch_stats`` holds a PowerNorm state (``psi2`` and ``nu``) is added to it;
    other perturbations are ignored. Returns a new tree (plain dicts).

    Raises:
      ValueError: if ``batch_stats`` holds PowerNorm states but none received an
        increment (usually the wrong tree was passed), or shapes differ.
    """
    applied = []

    def is_power_state(node: Any) -> bool:
        return isinstance(node, Mapping) and "psi2" in node and "nu" in node

    def walk(stats_node: Any, grad_node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(stats_node, Mapping):
            return stats_node
        out = dict(stats_node)
        if not isinstance(grad_node, Mapping):
            return out
        for key, grad in grad_node.items():
            if key not in stats_node:
                continue
            if key == "nu" and is_power_state(stats_node):
                nu = stats_node["nu"]
                if tuple(jnp.shape(grad)) != tuple(jnp.shape(nu)):
                    raise ValueError(
                        f"apply_nu_updates: the increment at {'/'.join(path)}/nu has "
                        f"shape {tuple(jnp.shape(grad))}, nu has "
                        f"{tuple(jnp.shape(nu))}."
                    )
                out["nu"] = nu + jnp.asarray(grad).astype(nu.dtype)
                applied.append(path)
            elif isinstance(grad, Mapping):
                out[key] = walk(stats_node[key], grad, (*path, key))
        return out

    def has_power_state(node: Any) -> bool:
        if not isinstance(node, Mapping):
            return False
        return is_power_state(node) or any(has_power_state(v) for v in node.values())

    new_stats = walk(batch_stats, perturbation_grads, ())
    if not applied and has_power_state(batch_stats):
        raise ValueError(
            "apply_nu_updates: batch_stats holds PowerNorm states but "
            "perturbation_grads has no matching 'nu'; pass the gradient w.r.t. "
            "variables['perturbations'] (the same module paths as batch_stats)."
        )
    return new_stats
