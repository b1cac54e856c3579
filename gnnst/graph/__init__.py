"""Graphs: spatial edges (a PyG transform), AnnData -> PyG Data, the on-disk graph dataset."""
