"""`python -m gemma_mlx.cli`."""

from .app import main

main()
