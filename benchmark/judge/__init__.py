"""The exact evaluator: per-object verdicts on an image, the metrics built on them, and the prompt families judged."""
