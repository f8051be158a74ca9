"""Ray Tune search spaces, as YAML files keyed by the same dotted paths as recipes."""
