"""PowerNorm (Shen et al. 2020, arXiv:2003.07845). No Flax import.

Batch norm for transformers with no centring: each feature is divided by its
quadratic mean psi (psi^2 = mean(x^2) over every other axis). Algorithm 2 of the
paper, per feature, alpha the momentum (Flax's convention), means over valid
elements::

    forward   x_hat = x / psi_{t-1},  psi_{t-1} = sqrt(psi2_{t-1} + eps)
              y = gamma * x_hat + beta
              psi2_t = alpha * psi2_{t-1} + (1 - alpha) * mean(x^2)
    backward  g = gamma * dL/dy,  Gamma = mean(x_hat^2),  Lambda = mean(g * x_hat)
              dL/dx = (g - nu_{t-1} * x_hat) / psi_{t-1}
              nu_t  = nu_{t-1} * (1 - (1 - alpha) Gamma) + (1 - alpha) Lambda
    eval      y = gamma * x / psi + beta

nu_t is known only in the backward pass, so the custom VJP takes nu as an input
and returns as its cotangent the increment ``nu_t - nu_{t-1}``: differentiate the
loss w.r.t. nu too (the Flax module routes it through ``Module.perturb``) and add
the result with :func:`apply_nu_updates`. An increment, because cotangents add
(a layer applied twice, gradients averaged over devices); note it is affine, not
linear, in dL/dy. With ``axis_name`` every device returns the same increment:
pmean it, do not sum it. The authors' ``ema_gz`` is nu / (1 - alpha).

Departures from the authors' code (sIncerass/powernorm): the backward divides by
the running psi_{t-1}, as Algorithm 2 says (the code: the batch psi after
warm-up); Gamma and Lambda count valid elements only (a padded element's output
is the bias, with no gradient to its input); during ``warmup_steps`` the forward
divides by the batch psi, with the exact gradient by default
(``warmup_gradient='approximate'``: the code's), nu is updated (warm at the
switch), and psi2 is the plain mean of the warm-up batches'; the code's
``GroupScaling1D`` is left out (compose with ``rms_norm``). ``variant='pn-v'`` is
the paper's PN-V: the batch psi forward, the exact gradient, no nu. Causal modes
only matter where a batch psi enters the forward (warm-up, PN-V); ``'running'``
never uses one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.batch import batch_moments
from normjax.functional.causal import Causal, parse_causal
from normjax.functional.core import (
    Normalized,
    Params,
    affine,
    broadcast_mask,
    feature_layout,
    standardize,
)
from normjax.stats import Axes, MeanVar

Array = jax.Array
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
    """``x * inv_psi`` (0 where ``mask`` is False) whose VJP is Algorithm 2's,
    with nu's cotangent the nu increment. ``exact`` (a 0/1 scalar, traced)
    switches to the exact gradient for ``inv_psi`` computed from the batch
    (warm-up)."""

    def selected(x: Array, mask: Array | None, dtype: Any) -> Array:
        x = x.astype(dtype)
        return x if mask is None else jnp.where(mask, x, 0.0)

    @jax.custom_vjp
    def power_scale(
        x: Array, inv_psi: Array, nu: Array, mask: Array | None, exact: Array
    ) -> Array:
        return selected(x, mask, inv_psi.dtype) * inv_psi

    def forward(x: Array, inv_psi: Array, nu: Array, mask: Any, exact: Array):
        return power_scale(x, inv_psi, nu, mask, exact), (x, inv_psi, nu, mask, exact)

    def backward(residuals: tuple, g_xhat: Array) -> tuple:
        x, inv_psi, nu, mask, exact = residuals
        x_stat = selected(x, mask, inv_psi.dtype)  # padding may hold NaN or inf
        x_hat = x_stat * inv_psi
        g_xhat = selected(g_xhat, mask, inv_psi.dtype)  # masked outputs are 0
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
        lambda_sum = stats.masked_sum(
            g_xhat * x_hat,
            reduction_axes,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
        lambda_stat = stats.safe_div(lambda_sum, m.count)
        nu_increment = (1.0 - nu_momentum) * (lambda_stat - nu * gamma_stat)

        dx = (g_xhat - (1.0 - exact) * nu * x_hat) * inv_psi
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
    causal: Causal = False,
    time_axis: int = 1,
    dtype: Any = None,
) -> Normalized:
    """PowerNorm: per-channel quadratic mean over every axis but ``axis``.

    x_BxLxD -> psi2_D; y = x / sqrt(psi2 + eps) * scale_D + bias_D, with psi2 the
    running value ``state['psi2']`` (eval, and training after warm-up), or the
    batch's mean(x^2) (warm-up, PN-V; cumulative over positions <= t along
    ``time_axis`` when ``causal`` is 'cumulative'). Training returns the new
    state: psi2 the running average ``momentum * old + (1 - momentum) * batch``
    (the warm-up batches' mean during warm-up; unchanged where no element is
    valid), steps + 1, nu unchanged — its update arrives as the cotangent of
    ``state['nu']`` (see the module docstring and :func:`apply_nu_updates`).

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
      causal, time_axis: False, 'cumulative' (or True), 'per_position' or
        'running' (see the module docstring); ``time_axis`` is the sequence axis.

    Returns:
      ``Normalized(y, new_state, {})``; y has ``x``'s dtype unless ``dtype`` is
      given.
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
    mode = parse_causal(causal, name=name)
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

    running = None  # the running psi2: x is divided by it, uncentred
    if state is not None:
        running = MeanVar(
            jnp.zeros(broadcast, stat_dtype),
            state["psi2"].astype(stat_dtype).reshape(broadcast),
        )

    if not train:
        assert running is not None
        y = standardize(x, running, epsilon, broadcast_mask(mask, x))
        y = affine(y, params, feature_axes, name=name)
        return Normalized(y.astype(out_dtype), state, {})

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
        divisor = stats.mean_var(batch)
        if not batch_forward:  # causal='running'
            assert running is not None
            divisor = running
        y = standardize(x, divisor, epsilon, mask)
        y = affine(y, params, feature_axes, name=name)
        if state is None:
            return Normalized(y.astype(out_dtype), None, {})
        psi2 = state["psi2"]
        new_psi2 = stats.ema(
            psi2.astype(stat_dtype), batch_psi2, momentum, valid=valid
        ).astype(psi2.dtype)
        return Normalized(y.astype(out_dtype), {**state, "psi2": new_psi2}, {})

    assert state is not None
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
    return Normalized(y.astype(out_dtype), new_state, {})


# ------------------------------------------------------------------- nu side channel


def apply_nu_updates(
    batch_stats: Mapping[str, Any], perturbation_grads: Mapping[str, Any]
) -> dict[str, Any]:
    """Adds the nu increments to every PowerNorm's ``nu`` (and the control
    process's ``u``/``v`` increments to every Online Normalization state) in a
    batch_stats tree.

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

    def is_online_state(node: Any) -> bool:  # Online Normalization's u and v
        return isinstance(node, Mapping) and all(
            k in node for k in ("mean", "var", "u", "v")
        )

    def walk(stats_node: Any, grad_node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(stats_node, Mapping):
            return stats_node
        out = dict(stats_node)
        if not isinstance(grad_node, Mapping):
            return out
        for key, grad in grad_node.items():
            if key not in stats_node:
                continue
            if (key == "nu" and is_power_state(stats_node)) or (
                key in ("u", "v") and is_online_state(stats_node)
            ):
                old = stats_node[key]
                if tuple(jnp.shape(grad)) != tuple(jnp.shape(old)):
                    raise ValueError(
                        f"apply_nu_updates: the increment at {'/'.join(path)}/{key} "
                        f"has shape {tuple(jnp.shape(grad))}, {key} has "
                        f"{tuple(jnp.shape(old))}."
                    )
                out[key] = old + jnp.asarray(grad).astype(old.dtype)
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
