"""The driver side: recipes, the command line, and the Ray jobs it launches."""
