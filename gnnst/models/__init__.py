"""Models: registry, layers, neighbour branch, the gnnst model, losses."""
