"""MSA: the Masked Stellar Autoencoder pipeline for Gaia XP spectra and photometry."""

__version__ = "0.1.0"
