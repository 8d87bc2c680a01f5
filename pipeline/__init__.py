"""Producing feature stores: extraction over image folders and imports of existing features."""
