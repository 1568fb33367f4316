# Split-conformal calibration of each label set's ensemble on the calibration split.


rule calibrate:
    input:
        members=member_models,
        shards=SHARD_LIST,
        labels=label_inputs(),
        surveys=[survey["catalogue"] for survey in config["calibrate"]["surveys"].values()],
    output:
        calibration=report(
            f"{RESULTS}/calibrate/{{label_set}}.json",
            caption="../report/calibration.rst",
            category="3. Calibration and evaluation",
            subcategory="{label_set}",
            labels={"label set": "{label_set}", "file": "calibration"},
        ),
        # written beside the calibration by msa calibrate (msa/calibration/support.py); predict reads it
        support=f"{RESULTS}/calibrate/{{label_set}}.support.npz",
    log:
        f"{LOGS}/calibrate/{{label_set}}.log",
    priority: CATALOGUE_PRIORITY
    conda:
        MSA_ENV
    threads: cpu_rule_threads(2)
    resources:
        mem_mb=8000,
        runtime=attempt_scaled(30),
    params:
        config=MSA_CONFIG,
        settings=lambda wildcards: settings(
            seed=config["seed"],
            calibrate=config["calibrate"],
            splits=config["splits"],
            label_set=label_set_settings(wildcards.label_set),
        ),
    shell:
        "msa calibrate --config {params.config:q} --label-set {wildcards.label_set:q} "
        "--members {input.members:q} --shards @{input.shards:q} --out {output.calibration:q} "
        "> {log:q} 2>&1"
