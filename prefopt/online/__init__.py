"""Online policy-gradient training (DESIGN §6): advantages, and the rollout step the trainer serves.

`advantages.py` holds the estimators (pure functions); `step.py` samples, scores and lays out the
completions of a batch of prompts for the losses that declare `needs_rollouts`.
"""
