"""FX passes of the quartet2 backend (installed as quartet_compile.passes)."""
