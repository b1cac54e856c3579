"""Data: manifests, readers to AnnData, image access, patches, patch encoders, expression."""
