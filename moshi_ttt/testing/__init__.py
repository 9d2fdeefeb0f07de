"""Real speech (`speech`: espeak-ng WAVs), shipped in the wheel because two commands users run need it:
`moshi-ttt bench`'s server section streams spoken input, and the spoken-memory experiment
(`moshi_ttt.experiments.spoken`) synthesises its conversations; and `suite_record`, the pytest plugin that records a
run of the suite for the README. The tests' other helpers are in tests/support/.
Never imported by the model, the server or training."""
