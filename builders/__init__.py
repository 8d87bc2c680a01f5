"""Pair shards derived from feature stores and public annotation files."""
