"""Model math: flow-matching conventions, rollouts, sampling, DP-DMD losses and the teacher-adapter interface at
this level; the teacher families (each with its adapter, loading and evaluation) in models/families/; measures
that serve every family in models/metrics/.

Nothing here knows of Ray, DeepSpeed, MLflow or S3; distribution is applied from outside (workers/).
"""
