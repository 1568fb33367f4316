"""The fine-tuning stage: ``msa finetune`` (stage), one epoch (engine), the quantile head on the
pretrained encoder (model), the labelled stars' batches (data)."""
