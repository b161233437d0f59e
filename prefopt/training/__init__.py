"""Training: `train(config)` and what it is made of: the run's inputs (examples, reference mode),
the guard (output folder, lock, resume), the one trainer, the reference (copy, adapter-off or
cached log-probs), callbacks, outputs, summary, the run's report.png and memory trimming.

Imports the packages below it (data, losses, models, rewards, online); never `iterative/`,
`evaluation/`, `cli/` or `bench/`. The public entry is `prefopt.train` (`prefopt.training.run.train`).
"""
