"""The spectra stages: XP reconstruction from the autoencoder (reconstruct), its flux-trained
members (train), their evaluation against a kNN and a cubic ridge on colours (evaluate, knn_baseline, polynomial_baseline), embeddings (embed)."""
