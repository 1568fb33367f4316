# The foundation model's own outputs: every shard's reconstructed XP coefficients (Archive units),
# their validation with XP hidden against a photometry kNN (with sampled-spectrum figures), and
# every shard's embeddings; like predict, one job per batch of `shards_per_job` shards, one
# Parquet file per shard in the batch's folder (written whole or not at all). Off by default
# (`reconstruct.enabled`, `embed.enabled`); on in the demo.
# With `reconstruct.training.enabled` the spectra come from members of the pretrained autoencoder
# trained further on the sampled flux (train_reconstruction), not from the pretrained model itself.


rule train_reconstruction:
    input:
        model=f"{RESULTS}/pretrain/model.pt",
        shards=SHARD_LIST,
    output:
        model=f"{RESULTS}/reconstruct/member-{{member}}.pt",
    log:
        f"{LOGS}/reconstruct/member-{{member}}.log",
    benchmark:
        f"{BENCHMARKS}/reconstruct/member-{{member}}.tsv"
    conda:
        MSA_ENV
    threads: gpu_rule_threads(4)
    resources:
        gpu=GPU_PER_JOB,
        mem_mb=16000,
        runtime=attempt_scaled(120),
    params:
        config=MSA_CONFIG,
        settings=settings(
            seed=config["seed"],
            # not `members` or `enabled`: adding a member must not retrain the others
            training={
                k: v
                for k, v in config["reconstruct"]["training"].items()
                if k not in ("members", "enabled")
            },
            held_out={
                k: config["pretrain"][k] for k in ("validation_fraction", "validation_shards")
            },
        ),
    shell:
        "msa train-reconstruction --config {params.config:q} --pretrained {input.model:q} "
        "--shards @{input.shards:q} --member {wildcards.member:q} --out {output.model:q} > {log:q} 2>&1"


rule reconstruct:
    input:
        models=autoencoder_models("reconstruct"),
        shards=batch_shard_files("reconstruct"),
    output:
        reconstructions=directory(f"{RESULTS}/reconstruct/{{batch}}"),
    log:
        f"{LOGS}/reconstruct/{{batch}}.log",
    benchmark:
        f"{BENCHMARKS}/reconstruct/{{batch}}.tsv"
    wildcard_constraints:
        batch=batch_constraint("reconstruct"),
    conda:
        MSA_ENV
    threads: gpu_rule_threads(2)
    resources:
        gpu=GPU_PER_JOB,
        mem_mb=8000,
        # a 530,000-star full-sky shard takes ~4 min at 2 CPU cores' 2,000-2,500 stars/s
        # (docs/results.md, section 5, the streaming table), less on a GPU: 10 min a shard leaves room
        runtime=attempt_scaled(per_batch_shard("reconstruct", 10)),
    params:
        config=MSA_CONFIG,
        hide_xp=["--hide-xp"] if config["reconstruct"]["hide_xp"] else [],
        settings=settings(hide_xp=config["reconstruct"]["hide_xp"]),
    shell:
        "msa reconstruct --config {params.config:q} --models {input.models:q} "
        "--shards {input.shards:q} --out-dir {output.reconstructions:q} {params.hide_xp:q} "
        "> {log:q} 2>&1"


rule evaluate_reconstruction:
    input:
        models=autoencoder_models("reconstruct"),
        shards=SHARD_LIST,
    output:
        evaluation=report(
            directory(f"{RESULTS}/reconstruct/evaluation"),
            patterns=["{name}.png", "{name}.json"],
            caption="../report/reconstruction.rst",
            category="5. XP reconstruction",
            labels={"file": "{name}"},
        ),
    log:
        f"{LOGS}/reconstruct/evaluation.log",
    benchmark:
        f"{BENCHMARKS}/reconstruct/evaluation.tsv"
    conda:
        MSA_ENV
    threads: cpu_rule_threads(2)
    resources:
        mem_mb=8000,
        runtime=attempt_scaled(60),
    params:
        config=MSA_CONFIG,
        settings=settings(
            seed=config["seed"],
            reconstruct={k: config["reconstruct"][k] for k in ("knn_neighbours", "spectra_stars")},
            held_out={
                k: config["pretrain"][k] for k in ("validation_fraction", "validation_shards")
            },
            g_mag_bins=config["evaluate"]["g_mag_bins"],
        ),
    shell:
        "msa evaluate-reconstruction --config {params.config:q} --models {input.models:q} "
        "--shards @{input.shards:q} --out-dir {output.evaluation:q} > {log:q} 2>&1"


rule embed:
    input:
        models=autoencoder_models("embed"),
        shards=batch_shard_files("embed"),
    output:
        embeddings=directory(f"{RESULTS}/embed/{{batch}}"),
    log:
        f"{LOGS}/embed/{{batch}}.log",
    benchmark:
        f"{BENCHMARKS}/embed/{{batch}}.tsv"
    wildcard_constraints:
        batch=batch_constraint("embed"),
    conda:
        MSA_ENV
    threads: gpu_rule_threads(2)
    resources:
        gpu=GPU_PER_JOB,
        mem_mb=8000,
        # ~1.5 min a full-sky shard at 2 CPU cores' ~6,000 stars/s
        # (docs/results.md, section 5, the streaming table)
        runtime=attempt_scaled(per_batch_shard("embed", 5)),
    params:
        config=MSA_CONFIG,
    shell:
        "msa embed --config {params.config:q} --models {input.models:q} "
        "--shards {input.shards:q} --out-dir {output.embeddings:q} > {log:q} 2>&1"
