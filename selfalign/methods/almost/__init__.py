"""ALMoST (Kim et al. 2023): mined prompts, synthetic comparisons, reward model, RM-guided
self-play, SFT and RL from synthetic feedback."""
