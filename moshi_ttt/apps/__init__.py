"""The `moshi-ttt` commands that are not the server or training: the CLI dispatcher, `infer` and `bench`."""
