# The one feature scaler, fitted on a seeded sample of shards and used by every later stage.


rule fit_scaler:
    input:
        shards=SHARD_LIST,
    output:
        scaler=f"{RESULTS}/scaler.json",
    log:
        f"{LOGS}/fit_scaler.log",
    benchmark:
        f"{BENCHMARKS}/fit_scaler.tsv"
    conda:
        MSA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=attempt_scaled(30),
    params:
        config=MSA_CONFIG,
        settings=settings(seed=config["seed"], scaler=config["scaler"], features=config["features"]),
    shell:
        "msa fit-scaler --config {params.config:q} --shards @{input.shards:q} --out {output.scaler:q} "
        "> {log:q} 2>&1"
