"""Test and benchmark helpers that ship with the package: speech fixtures (espeak-ng), the serve
subprocess launcher and raw protocol probes. Never imported by the model, the server or training."""
