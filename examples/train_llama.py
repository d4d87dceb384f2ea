"""Train a small Llama with one torch.compile backend: ``python examples/train_llama.py --help``.

A thin wrapper: the demo lives in ``quartet_compile.demo`` (also ``python -m quartet_compile.demo``
and the ``quartet-demo`` command), so the example and the installed command never drift apart.
"""

from quartet_compile.demo import main

if __name__ == "__main__":
    main()
