"""Helpers of the tests and of the scripts that drive a running server (not in the wheel): the serve subprocess
launcher (`launcher`), what a running server reports (`observe`), raw protocol probes (`probe`), hostile
clients (`attackers`), conversation memory through a server (`memory_client`) and content-level audio
comparison (`audio_match`). Importable as `support` (pyproject's pytest `pythonpath` puts tests/ on sys.path;
a script puts it there itself)."""
