"""Model math: flow-matching conventions, rollouts, DP-DMD losses and teacher-family adapters.

Nothing here knows of Ray, DeepSpeed, MLflow or S3; distribution is applied from outside (workers/).
"""
