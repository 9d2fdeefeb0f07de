"""TTT-Moshi models: `lm` (TTTLMModel, TTTLMGen and its fold clock), `loaders` (Kyutai checkpoints, TTT
weights files and the TTT-config precedence) and `demo` (the tiny offline demo checkpoint)."""
