"""The MUKI math, apart from Ray: pure numpy and torch, unit-tested against hand-worked numbers.

Imports neither Ray nor any other folder of the package. Entry points:
`mc_dropout.mc_predict` (MC-Dropout passes, step 1), `strategies.STRATEGIES` and `strategies.integrate`
(uncertainty-weighted targets, steps 2-3), `losses` (the student's losses, step 4), and what the project
adds beyond the paper: `prototypes.prototype_scores`, `owners.owner_posteriors`, `refine`. `stats.Sketch`
folds pool-wide statistics from blocks.
"""
