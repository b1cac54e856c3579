"""Training: the one training loop of every registered model (trainer), what a fit needs (prepare), the
ensemble packaged as a TrainedModel (ensemble), distributed set-up."""
