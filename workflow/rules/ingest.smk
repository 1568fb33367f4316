# One job per input file pair: Gaia Archive XP (+ gaia_source, survey tables) -> one HDF5 shard.


rule ingest:
    input:
        unpack(ingest_inputs),
    output:
        shard=f"{RESULTS}/store/{{shard}}.h5",
    log:
        f"{LOGS}/ingest/{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/ingest/{{shard}}.tsv"
    conda:
        MSA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=attempt_scaled(30),
    params:
        config=MSA_CONFIG,
        settings=settings(ingest=config["ingest"]),
    shell:
        "msa ingest --config {params.config:q} --shard {wildcards.shard:q} --out {output.shard:q} "
        "> {log:q} 2>&1"


localrules:
    shard_list,


rule shard_list:
    input:
        shards=SHARD_FILES,
    output:
        shard_list=SHARD_LIST,
    log:
        f"{LOGS}/shard_list.log",
    run:
        write_shard_list(input.shards, output.shard_list, log[0])
