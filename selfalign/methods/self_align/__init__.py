"""Self-Align (Sun et al. 2023): red-teaming self-instruct, principle-driven answers, principle
engraving, verbose cloning."""
