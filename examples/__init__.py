"""quartet_demo: a small Llama trained end to end with ``torch.compile(backend="quartet2")``.

Installed from ``examples/`` as its own top-level package so the core ``quartet_compile`` never
imports the demo's model, corpus, training loop or launcher. Run it with ``python -m quartet_demo``
(or the ``quartet-demo`` command); see docs/demo.md.
"""
