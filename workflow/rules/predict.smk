# Full-sky prediction: one job per shard and label set, calibrated quantiles into Parquet.
# The catalogue holds the same rows: with `catalog.keep_shard_predictions: false` these files are
# temp() and go once their catalogue is written. On SLURM the jobs run in groups (one GPU, one
# job after another; profiles/slurm), not as thousands of one-minute submissions.


rule predict:
    input:
        members=member_models,
        calibration=f"{RESULTS}/calibrate/{{label_set}}.json",
        shard=f"{RESULTS}/store/{{shard}}.h5",
    output:
        predictions=shard_predictions(f"{RESULTS}/predict/{{label_set}}/{{shard}}.parquet"),
    log:
        f"{LOGS}/predict/{{label_set}}/{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/predict/{{label_set}}/{{shard}}.tsv"
    conda:
        MSA_ENV
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=attempt_scaled(30),
    params:
        config=MSA_CONFIG,
        settings=settings(predict=config["predict"]),
    shell:
        "msa predict --config {params.config:q} --label-set {wildcards.label_set:q} "
        "--members {input.members:q} --calibration {input.calibration:q} --shard {input.shard:q} "
        "--out {output.predictions:q} > {log:q} 2>&1"
