"""The pretraining stage: ``msa pretrain`` (stage), one epoch of masked-autoencoder training (engine)."""

# Other stages import only these names, from the package itself, never its modules.
from msa.pretrain.stage import held_out_of_pretraining, load_pretrained

__all__ = ["held_out_of_pretraining", "load_pretrained"]
