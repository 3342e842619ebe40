"""The benchmark's models and their training: scenes and captions, the tokenizer, the tiny SD-layout model, its anchor layers."""
