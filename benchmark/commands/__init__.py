"""What users and the README run: the demo, the effect table, the LoRA fine-tuning, and the cost measurements."""
