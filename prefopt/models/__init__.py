"""Models: find them (hub aliases, the packaged GGUF), load them for training or inference, make
them lean, choose their precision, and run them: completion log-probs, token KL and sampling.

Below `rewards/`, `online/` and `training/`; knows nothing of losses or trainers. Import the
modules themselves (`prefopt.models.logps`, ...): this package imports nothing on its own, so
`import prefopt.models.hub` stays cheap.
"""
