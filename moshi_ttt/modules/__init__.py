"""Moshi building blocks with TTT: the gated MLP with fast weights (`gating.TTTGating`, where moshi has
`ActivationGating`) and the transformer layer / StreamingTransformer that hand X0 to it (`transformer`)."""
