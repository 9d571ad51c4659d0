"""The shared machinery: engines, row store, models, recipes, pipeline, training, report.

Nothing here imports from `selfalign.methods` or `selfalign.evals` at module level."""
