"""The shared machinery: engines, row store, models, recipes, pipeline, training, report.

Nothing here imports from `selfalign.methods`, `selfalign.evals`, the stage registry or the CLI, not
even inside a function: the stage registry is handed in from above (`selfalign.stages`).
`tests/test_layout.py` checks this and that the package's import graph has no loop."""
