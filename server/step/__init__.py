"""The model step: `engine.Engine` (N conversation slots sharing one batched Mimi + LMGen with TTT) and
`build_engine` (the engine from the command-line flags). Imports torch; runs in the model worker process,
or in the web process with `--workers 0`."""
