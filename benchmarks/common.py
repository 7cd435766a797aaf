"""Benchmark plumbing on the device: ceilings, random weights built on the device, timing, memory.

Everything that must not touch the GPU (run context, result rows, child processes, FLOP counts)
lives in ``benchmarks/harness.py`` and is re-exported here for the benchmark scripts that import
``common``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from benchmarks.harness import RESULTS, emit, record, run_subprocess, versions  # noqa: F401


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", str(d))


def median_time(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of ``fn(*args)`` (blocked until ready), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings() -> dict:
    """bf16 matmul TFLOP/s (8192^3, random data) and copy GB/s (read + write), measured now."""
    k1, k2 = jax.random.split(jax.random.key(0))
    n = 8192
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    t = median_time(jax.jit(lambda a, b: a @ b), a, b)
    x = jax.random.normal(k1, (2**29,), jnp.bfloat16)
    tc = median_time(jax.jit(lambda x: x * 2), x)
    return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_gbps": 2 * x.nbytes / tc / 1e9}


def peak_gib() -> float:
    """Peak bytes the allocator handed out in this process so far (``peak_bytes_in_use``), GiB."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def bytes_limit_gib() -> float | None:
    """The allocator's pool limit (``bytes_limit``: what ``XLA_PYTHON_CLIENT_MEM_FRACTION`` set),
    GiB."""
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["bytes_limit"] / 2**30, 2) if "bytes_limit" in stats else None


def random_params(cfg, key, *, dtype=jnp.bfloat16, quantize: bool = False, std: float = 0.02):
    """Random weights for ``cfg`` built on the device one layer slice at a time.

    With ``quantize``, every decoder linear is NF4-quantized slice by slice, so the 16-bit model is
    never resident (what a 24 GiB card needs for a 20B model).
    """
    from fastjax.models import registry

    fam = registry.family_of(cfg)
    shapes = fam.param_shapes(cfg)
    qfn = None
    if quantize:
        from fastjax import quant

        qc = quant.QuantConfig()
        qfn = jax.jit(
            lambda w: quant.quantize_nf4(w, block_size=qc.block_size, double_quant=qc.double_quant)
        )
    normal = jax.jit(
        lambda k, shape: (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
        static_argnums=1,
    )

    def tensors():  # one at a time: stack_layers writes each into its stacked buffer and drops it
        for i, (name, shape) in enumerate(sorted(shapes.items())):
            if name.endswith("norm.weight"):
                value = jnp.ones(shape, dtype)
            elif name.endswith(".bias"):
                value = jnp.zeros(shape, dtype)
            else:
                value = normal(jax.random.fold_in(key, i), tuple(shape))
                if (
                    qfn is not None
                    and name.startswith("model.layers.")
                    and name.endswith("_proj.weight")
                ):
                    value = qfn(value)
            yield name, value
            del value

    return fam.stack_layers(tensors(), cfg.num_hidden_layers)
