"""Triton kernels behind the quartet2 ops (installed as quartet_compile.kernels)."""
