"""Evaluation: a trained model against its reference on held-out pairs (implicit-reward accuracy,
margins, the loss) and on sampled answers (a reward, a judge's win rate). `prefopt report` draws
runs with `prefopt.training.report`, the same code that writes each run's report.png."""
