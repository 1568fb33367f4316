"""The spectra stages: XP reconstruction from the autoencoder (reconstruct), its flux-trained
members (train), their evaluation against a photometric kNN (evaluate, knn_baseline), embeddings (embed)."""
