"""Shipped configs (YAML package data); read them with `moshi_ttt.ttt.config`."""
