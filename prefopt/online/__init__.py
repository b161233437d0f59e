"""Per-step services the trainer calls for online policy-gradient losses (DESIGN §6).

`step.py` samples, scores and lays out the completions of a batch of prompts for the losses that
declare `needs_rollouts`; `critic.py` is PPO's value head (`needs_value_model`). The advantage
estimators are pure maths and live beside the losses that use them (`prefopt/losses/_advantages.py`).
"""
