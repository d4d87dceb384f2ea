"""``python -m quartet_demo`` (also ``torchrun ... -m quartet_demo``): run the demo."""

from quartet_demo.demo import main

main()
