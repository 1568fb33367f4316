"""The catalogue stages: ``msa predict`` (predict) and ``msa catalog`` (the HATS catalogue, catalog)."""
