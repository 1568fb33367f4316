"""The network layer: the masked autoencoder, its quantile head, masking, losses, perturbation by
the measurement errors, checkpoints and the training loop's parts. It imports the data layer only."""
