# Metrics and figures of each label set on the test split (model vs baseline, XP on/off).


rule evaluate:
    input:
        members=member_models,
        scratch=scratch_member_models,
        calibration=f"{RESULTS}/calibrate/{{label_set}}.json",
        shards=SHARD_LIST,
        labels=label_inputs(),
        probe=f"{RESULTS}/pretrain/probe-{{label_set}}.json",
    output:
        evaluation=report(
            directory(f"{RESULTS}/evaluate/{{label_set}}"),
            patterns=["{name}.png", "{name}.json"],
            caption="../report/evaluation.rst",
            category="3. Calibration and evaluation",
            subcategory="{label_set}",
            labels={"label set": "{label_set}", "file": "{name}"},
        ),
    log:
        f"{LOGS}/evaluate/{{label_set}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{{label_set}}.tsv"
    conda:
        MSA_ENV
    threads: cpu_rule_threads(2)
    resources:
        mem_mb=8000,
        runtime=attempt_scaled(60),
    params:
        config=MSA_CONFIG,
        settings=lambda wildcards: settings(
            seed=config["seed"],
            evaluate=config["evaluate"],
            splits=config["splits"],
            label_set=label_set_settings(wildcards.label_set),
        ),
    shell:
        "msa evaluate --config {params.config:q} --label-set {wildcards.label_set:q} "
        "--members {input.members:q} --scratch-members {input.scratch:q} "
        "--calibration {input.calibration:q} --shards @{input.shards:q} "
        "--probe {input.probe:q} --out-dir {output.evaluation:q} > {log:q} 2>&1"
