"""Logs, metrics and (optional) traces of the running service."""
