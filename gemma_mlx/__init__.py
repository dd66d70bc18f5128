"""gemma-mlx: a native MLX runtime for Gemma 4 12B."""
