"""The benchmark's models and their training: scenes, the tokenizer, the tiny SD-layout model, its anchor layers."""
