"""Benchmarks of the project's own code: the train function on a GPU machine (no Ray there), and the
trajectory store's read checks on any machine."""
