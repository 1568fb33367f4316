# Masked-autoencoder pretraining in segments of `pretrain.epochs_per_job` epochs: each segment is
# one job resuming from the previous one, so no job outlives a cluster's wall time. A segment
# killed mid-way (SIGTERM at wall time, preemption) resumes from its in-progress checkpoint in
# pretrain/work/ when Snakemake retries it.
#
# Multi-GPU: give the rule more GPUs (profile `set-resources: pretrain_segment: gpu: 4`) and it
# runs under `torchrun --standalone --nproc-per-node <gpu>` (DDP, one process per GPU).


rule pretrain_segment:
    input:
        shards=SHARD_LIST,
        scaler=f"{RESULTS}/scaler.json",
        previous=previous_segment,
        labels=label_target_inputs(),
    output:
        model=f"{RESULTS}/pretrain/segment-{{segment}}.pt",
        metrics=f"{RESULTS}/pretrain/segment-{{segment}}.metrics.jsonl",
        loss=f"{RESULTS}/pretrain/segment-{{segment}}.loss.png",
    log:
        f"{LOGS}/pretrain/segment-{{segment}}.log",
    benchmark:
        f"{BENCHMARKS}/pretrain/segment-{{segment}}.tsv"
    conda:
        MSA_ENV
    threads: gpu_rule_threads(4)
    resources:
        gpu=GPU_PER_JOB,
        mem_mb=16000,
        runtime=attempt_scaled(120),
    params:
        config=MSA_CONFIG,
        out_dir=subpath(output.model, parent=True),
        launcher=launcher,
        settings=settings(
            seed=config["seed"],
            pretrain=config["pretrain"],
            model=config["model"],
            features=config["features"],
            held_out=held_out_label_settings(),
            label_targets=label_target_settings(),
        ),
    shell:
        "{params.launcher} pretrain --config {params.config:q} --shards @{input.shards:q} "
        "--scaler {input.scaler:q} --out-dir {params.out_dir:q} --segment {wildcards.segment:q} "
        ">> {log:q} 2>&1"


rule pretrain_model:
    input:
        model=segment_path(N_SEGMENTS - 1),
        metrics=segment_path(N_SEGMENTS - 1, ".metrics.jsonl"),
        loss=segment_path(N_SEGMENTS - 1, ".loss.png"),
    output:
        # protected: hours of GPU time; to retrain, delete it (Snakemake refuses to overwrite it)
        model=protected(f"{RESULTS}/pretrain/model.pt"),
        metrics=f"{RESULTS}/pretrain/metrics.jsonl",
        loss=report(
            f"{RESULTS}/pretrain/loss.png",
            caption="../report/pretrain_loss.rst",
            category="1. Pretraining",
        ),
    log:
        f"{LOGS}/pretrain/model.log",
    localrule: True
    conda:
        MSA_ENV
    shell:
        "(cp {input.model:q} {output.model:q} && cp {input.metrics:q} {output.metrics:q} "
        "&& cp {input.loss:q} {output.loss:q}) > {log:q} 2>&1"


# The representation's own measure, cheap enough to choose a pretraining run by: ridge per label
# from the frozen latent (penalty on validation) beside raw inputs and a random encoder.
rule probe_pretrained:
    input:
        model=f"{RESULTS}/pretrain/model.pt",
        shards=SHARD_LIST,
        scaler=f"{RESULTS}/scaler.json",
        labels=label_inputs(),
    output:
        f"{RESULTS}/pretrain/probe-{{label_set}}.json",
    log:
        f"{LOGS}/pretrain/probe-{{label_set}}.log",
    conda:
        MSA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=attempt_scaled(30),
    params:
        config=MSA_CONFIG,
        settings=lambda wildcards: settings(
            seed=config["seed"],
            splits=config["splits"],
            label_set=label_set_settings(wildcards.label_set),
        ),
    shell:
        "msa probe --config {params.config:q} --label-set {wildcards.label_set:q} "
        "--pretrained {input.model:q} --shards @{input.shards:q} --scaler {input.scaler:q} "
        "--out {output:q} > {log:q} 2>&1"
