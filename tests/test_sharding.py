"""Data parallelism on 8 simulated CPU devices (``jax.sharding``): batch
statistics pooled over devices equal one device's on the concatenated batch.

JAX fixes the device count when it starts, so the checks run in a fresh
process with ``--xla_force_host_platform_device_count=8`` and report back.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import xla_flags_with_devices

pytestmark = pytest.mark.slow  # 8 simulated devices and 2 processes, in subprocesses

DEVICES = 8

_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from normjax import functional as F, nn

    assert jax.device_count() == 8, jax.device_count()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    one = jax.devices()[0]
    rng = np.random.default_rng(0)
    # 8 devices x 4 samples; channels with very different means and scales.
    x = rng.normal(size=(32, 5, 5, 6)) * [1, 10, 0.1, 3, 1, 100]
    x = x + [0, 5, -3, 50, 1, 0]
    x = x.astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    params = {"scale": jnp.asarray(rng.normal(size=6), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}
    stats = {"mean": jnp.zeros(6), "var": jnp.ones(6)}
    # Unequal valid counts per device: 4, 1, 0, 3, 4, 2, 4, 1 of 4.
    valid = np.array([4, 1, 0, 3, 4, 2, 4, 1])
    mask = (np.arange(4)[None, :] < valid[:, None]).reshape(32)
    out = {}

    def diff(a, b):
        a, b = jax.tree.leaves(a), jax.tree.leaves(b)
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)) /
                             (1 + np.abs(np.asarray(v))))) for u, v in zip(a, b))

    def bn(x, mask=None, **kw):
        def f(x, params):
            y, new, _ = F.batch_norm(x, params, stats, train=True, mask=mask, **kw)
            return y, new
        (y, new), vjp = jax.vjp(f, x, params)
        return y, new, vjp((jnp.asarray(dy), jax.tree.map(jnp.zeros_like, new)))

    # 1. Global-batch statistics through jit + sharding (GSPMD inserts the
    #    all-reduces): the same as one device on the whole batch.
    with jax.default_device(one):
        want = bn(jnp.asarray(x))
        want_masked = bn(jnp.asarray(x), jnp.asarray(mask)[:, None, None, None])
    xs = jax.device_put(x, data)
    got = jax.jit(bn)(xs)
    assert len(got[0].sharding.device_set) == 8
    out["global_jit"] = diff(got, want)
    ms = jax.device_put(mask[:, None, None, None], data)
    out["global_jit_masked"] = diff(jax.jit(bn)(xs, ms), want_masked)

    # 2. The same through shard_map with axis_name: explicit collectives, each
    #    device holding its 4 samples; unequal valid counts pooled exactly.
    def local(x, mask):
        y, new, _ = F.batch_norm(x, params, stats, train=True, mask=mask,
                              axis_name="data")
        return y, new
    sm = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                       out_specs=(P("data"), P()))
    y, new = jax.jit(sm)(xs, ms)
    out["shard_map_masked_y"] = diff(y, want_masked[0])
    out["shard_map_masked_stats"] = diff(new, want_masked[1])
    # and its gradient: the collectives' transposes
    def loss(x, params, mask):
        f = jax.shard_map(
            lambda x, p, m: F.batch_norm(x, p, stats, train=True, mask=m,
                                         axis_name="data").y,
            mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P("data"))
        return jnp.sum(f(x, params, mask) * dy)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, params, ms)
    out["shard_map_masked_grads"] = diff(grads, (want_masked[2][0], want_masked[2][1]))

    # 3. Per-device statistics: shard_map without axis_name normalizes each
    #    device's samples alone = one device on each shard in turn.
    def alone(x):
        return F.batch_norm(x, params, stats, train=True).y
    per_device = jax.jit(jax.shard_map(alone, mesh=mesh, in_specs=P("data"),
                                       out_specs=P("data")))(xs)
    with jax.default_device(one):
        each = jnp.concatenate([alone(jnp.asarray(x[4 * i:4 * i + 4]))
                                for i in range(8)])
    out["per_device"] = diff(per_device, each)
    # 4. Ghost batches of one device's size under jit + sharding: the same
    #    numbers as ghost batches on one device, and as per-device statistics.
    def ghost(x):
        return F.batch_norm(x, params, stats, train=True, ghost_batch_size=4).y
    with jax.default_device(one):
        ghost_one = ghost(jnp.asarray(x))
    ghost_sharded = jax.jit(ghost)(xs)
    out["ghost_vs_one_device"] = diff(ghost_sharded, ghost_one)
    out["ghost_vs_per_device"] = diff(ghost_sharded, each)
    # 5. The Flax module with axis_name under shard_map, as in pmap-style code.
    layer = nn.BatchNorm(axis_name="data")
    variables = layer.init(jax.random.key(0), x[:4], use_running_average=True)
    def module(x):
        return layer.apply(variables, x, use_running_average=False,
                           mutable=["batch_stats"])
    y_mod, upd = jax.jit(jax.shard_map(module, mesh=mesh, in_specs=P("data"),
                                       out_specs=(P("data"), P())))(xs)
    with jax.default_device(one):
        y_one, upd_one = nn.BatchNorm().apply(variables, jnp.asarray(x),
                                     use_running_average=False,
                                     mutable=["batch_stats"])
    out["module_shard_map"] = diff((y_mod, upd), (y_one, upd_one))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results():
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags_with_devices(DEVICES),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "check",
    [
        "global_jit",
        "global_jit_masked",
        "shard_map_masked_y",
        "shard_map_masked_stats",
        "shard_map_masked_grads",
        "per_device",
        "ghost_vs_one_device",
        "ghost_vs_per_device",
        "module_shard_map",
    ],
)
def test_eight_devices_match_one_device(results, check):
    # relative (to 1 + |value|) max difference: float32 reduction order only
    assert results[check] < 2e-5, (check, results[check])


_HOSTS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                               process_id=int(sys.argv[1]))
    import jax.numpy as jnp, numpy as np
    from normjax import functional as F
    from normjax.train import loop
    mesh = loop.make_mesh()
    rng = np.random.default_rng(0)  # every host builds the same global batch
    x = rng.normal(size=(8, 3, 3, 4)) * [1, 10, 3, 0.1] + [0, 5, -2, 40]
    xs = loop.shard_batch({"x": x.astype(np.float32)}, mesh)["x"]
    stats = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
    y, new, _ = jax.jit(lambda x: F.batch_norm(x, None, stats, train=True,
                                            momentum=0.0))(xs)
    local = [np.asarray(s.data).tolist() for s in y.addressable_shards]
    rows = [s.index[0].start for s in y.addressable_shards]
    print(json.dumps({"devices": jax.device_count(),
                      "local_devices": jax.local_device_count(),
                      "mean": np.asarray(new["mean"]).tolist(),
                      "var": np.asarray(new["var"]).tolist(),
                      "rows": rows, "y": local}))
    """
)


def test_two_hosts_pool_batch_statistics_over_the_global_batch():
    """Two processes (hosts) of 2 CPU devices each, joined by
    ``jax.distributed.initialize``: each fills its devices' shards of the same
    global batch and batch norm's statistics are the global batch's."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags_with_devices(2),
        "JAX_PLATFORMS": "cpu",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HOSTS_SCRIPT, str(i), address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 3, 4)) * [1, 10, 3, 0.1] + [0, 5, -2, 40]
    x = x.astype(np.float32).astype(np.float64)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    y = (x - mean) / np.sqrt(var + 1e-5)
    seen = set()
    for out in outs:
        assert out["devices"] == 4 and out["local_devices"] == 2
        np.testing.assert_allclose(out["mean"], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["var"], var, rtol=1e-5, atol=1e-5)
        for start, shard in zip(out["rows"], out["y"], strict=True):
            seen.add(start)
            np.testing.assert_allclose(shard, y[start : start + 2], atol=1e-4)
    assert seen == {0, 2, 4, 6}  # the hosts' devices cover the whole batch
