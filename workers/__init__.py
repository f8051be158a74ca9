"""Code that runs on Ray workers and actors (or in a single process): configs, training and precompute."""
