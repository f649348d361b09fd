"""Building blocks shared by the model families: norms, rope, attention with caches, MLPs, MoE routing."""
