"""Pallas GPU kernels (Triton backend), one module per op, each with a pure-jnp reference.

Installed as ``fastjax.pallas_kernels``. Every kernel runs compiled on a CUDA GPU and in Pallas interpret mode
elsewhere; ``FASTJAX_PALLAS_INTERPRET`` (see ``_common``) switches interpret mode for all of them at once.
"""
