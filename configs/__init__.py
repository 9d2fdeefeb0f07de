"""Shipped configs (YAML package data); read them with `moshi_ttt.config_files`."""
