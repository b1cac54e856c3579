"""Exports: predictions and graphs back to AnnData for scanpy/squidpy, and graphs to networkx."""
