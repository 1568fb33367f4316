# Full-sky prediction: one job per label set and batch of `predict.shards_per_job` consecutive
# shards, which loads the ensemble once and writes one Parquet file per shard into the batch's
# folder (written whole or not at all). Re-ingesting one shard re-runs its whole batch; a shard
# added or removed renumbers the batches after it, which then re-run too. The catalogue holds the
# same rows: with `catalog.keep_shard_predictions: false` the folders are temp() and go once their
# catalogue is written.


rule predict:
    input:
        members=member_models,
        calibration=f"{RESULTS}/calibrate/{{label_set}}.json",
        # the support index msa predict finds beside the calibration (support, low_support columns)
        support=f"{RESULTS}/calibrate/{{label_set}}.support.npz",
        shards=batch_shard_files("predict"),
    output:
        predictions=batch_predictions(directory(f"{RESULTS}/predict/{{label_set}}/{{batch}}")),
    log:
        f"{LOGS}/predict/{{label_set}}/{{batch}}.log",
    benchmark:
        f"{BENCHMARKS}/predict/{{label_set}}/{{batch}}.tsv"
    wildcard_constraints:
        batch=batch_constraint("predict"),
    priority: CATALOGUE_PRIORITY
    conda:
        MSA_ENV
    threads: gpu_rule_threads(2)
    resources:
        gpu=GPU_PER_JOB,
        mem_mb=8000,
        # ~1 min a shard on a GPU, with room to spare; more with each retry
        runtime=attempt_scaled(per_batch_shard("predict", 6)),
    params:
        config=MSA_CONFIG,
        settings=settings(predict=config["predict"]),
    shell:
        "msa predict --config {params.config:q} --label-set {wildcards.label_set:q} "
        "--members {input.members:q} --calibration {input.calibration:q} --shards {input.shards:q} "
        "--out-dir {output.predictions:q} > {log:q} 2>&1"
