"""Graphs: spatial edges (one builder, :func:`gnnst.graph.edges.slide_graph`; a PyG transform), AnnData ->
PyG Data, the on-disk graph dataset, halo-subgraph mini-batches, graphs in squidpy's AnnData keys."""
