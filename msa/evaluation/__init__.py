"""The evaluation stage: ``msa evaluate`` (metrics, figures) against its yardsticks, the trees
(baselines) and the plain MLP (baseline_mlp)."""
