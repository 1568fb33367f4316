# One job per label set and ensemble member. `finetune.members` is deliberately not in the
# params: raising it adds member jobs and leaves the existing members alone.
# `finetune_scratch` trains the same members from a random encoder (evaluate.from_scratch): the
# yardstick that measures what pretraining adds. With finetune.photometry_members, the
# `*_photometry` rules train as many members that never see XP (photometry-<k>/), which serve
# the stars without XP on their own schedule (finetune.photometry_overrides).
# `cache_rows` only decides whether the train split stays in memory (the model is the same).
NOT_RESULT_SETTINGS = ("members", "cache_rows", "photometry_members")
# and a member with XP does not depend on the photometry-only members' settings
XP_MEMBER_IGNORES = NOT_RESULT_SETTINGS + ("photometry_overrides",)


rule finetune:
    input:
        pretrained=f"{RESULTS}/pretrain/model.pt",
        shards=SHARD_LIST,
        scaler=f"{RESULTS}/scaler.json",
        labels=label_inputs(),
    output:
        # protected: a trained member is not overwritten by accident; to retrain, delete it
        model=protected(f"{RESULTS}/finetune/{{label_set}}/member-{{member}}/model.pt"),
        metrics=f"{RESULTS}/finetune/{{label_set}}/member-{{member}}/metrics.jsonl",
        loss=report(
            f"{RESULTS}/finetune/{{label_set}}/member-{{member}}/loss.png",
            caption="../report/finetune_loss.rst",
            category="2. Fine-tuning",
            subcategory="{label_set}",
            labels={"label set": "{label_set}", "member": "{member}"},
        ),
    log:
        f"{LOGS}/finetune/{{label_set}}/member-{{member}}.log",
    benchmark:
        f"{BENCHMARKS}/finetune/{{label_set}}/member-{{member}}.tsv"
    priority: CATALOGUE_PRIORITY
    conda:
        MSA_ENV
    threads: gpu_rule_threads(4)
    resources:
        gpu=GPU_PER_JOB,
        mem_mb=16000,
        runtime=attempt_scaled(60),
    params:
        config=MSA_CONFIG,
        out_dir=subpath(output.model, parent=True),
        start=lambda wildcards, input: ["--pretrained", input.pretrained],  # quoted word by word
        settings=lambda wildcards: settings(
            seed=config["seed"],
            finetune=section("finetune", drop=XP_MEMBER_IGNORES),
            splits=config["splits"],
            label_set=label_set_settings(wildcards.label_set),
        ),
    shell:
        "msa finetune --config {params.config:q} --label-set {wildcards.label_set:q} "
        "--member {wildcards.member:q} {params.start:q} --shards @{input.shards:q} "
        "--scaler {input.scaler:q} --out-dir {params.out_dir:q} >> {log:q} 2>&1"


# the from-scratch yardstick only feeds evaluate: not on the catalogue's path
use rule finetune as finetune_scratch with:
    input:
        shards=SHARD_LIST,
        scaler=f"{RESULTS}/scaler.json",
        labels=label_inputs(),
    output:
        model=f"{RESULTS}/finetune_scratch/{{label_set}}/member-{{member}}/model.pt",
        metrics=f"{RESULTS}/finetune_scratch/{{label_set}}/member-{{member}}/metrics.jsonl",
        loss=f"{RESULTS}/finetune_scratch/{{label_set}}/member-{{member}}/loss.png",
    log:
        f"{LOGS}/finetune_scratch/{{label_set}}/member-{{member}}.log",
    benchmark:
        f"{BENCHMARKS}/finetune_scratch/{{label_set}}/member-{{member}}.tsv"
    priority: 0
    params:
        config=MSA_CONFIG,
        out_dir=subpath(output.model, parent=True),
        start=["--from-scratch"],
        settings=lambda wildcards: settings(
            seed=config["seed"],
            finetune=section("finetune", drop=XP_MEMBER_IGNORES),
            splits=config["splits"],
            label_set=label_set_settings(wildcards.label_set),
            model=config["model"],
            # the multitask loss and the masks fall back to pretraining's settings
            pretrain=section("pretrain", drop=("epochs", "epochs_per_job", "checkpoint_every")),
        ),


use rule finetune as finetune_photometry with:
    output:
        model=protected(f"{RESULTS}/finetune/{{label_set}}/photometry-{{member}}/model.pt"),
        metrics=f"{RESULTS}/finetune/{{label_set}}/photometry-{{member}}/metrics.jsonl",
        loss=f"{RESULTS}/finetune/{{label_set}}/photometry-{{member}}/loss.png",
    log:
        f"{LOGS}/finetune/{{label_set}}/photometry-{{member}}.log",
    benchmark:
        f"{BENCHMARKS}/finetune/{{label_set}}/photometry-{{member}}.tsv"
    params:
        config=MSA_CONFIG,
        out_dir=subpath(output.model, parent=True),
        start=lambda wildcards, input: ["--pretrained", input.pretrained, "--photometry-only"],
        settings=lambda wildcards: settings(
            seed=config["seed"],
            finetune=section("finetune", drop=NOT_RESULT_SETTINGS),
            splits=config["splits"],
            label_set=label_set_settings(wildcards.label_set),
        ),


use rule finetune_scratch as finetune_scratch_photometry with:
    output:
        model=f"{RESULTS}/finetune_scratch/{{label_set}}/photometry-{{member}}/model.pt",
        metrics=f"{RESULTS}/finetune_scratch/{{label_set}}/photometry-{{member}}/metrics.jsonl",
        loss=f"{RESULTS}/finetune_scratch/{{label_set}}/photometry-{{member}}/loss.png",
    log:
        f"{LOGS}/finetune_scratch/{{label_set}}/photometry-{{member}}.log",
    benchmark:
        f"{BENCHMARKS}/finetune_scratch/{{label_set}}/photometry-{{member}}.tsv"
    params:
        config=MSA_CONFIG,
        out_dir=subpath(output.model, parent=True),
        start=["--from-scratch", "--photometry-only"],
        settings=lambda wildcards: settings(
            seed=config["seed"],
            finetune=section("finetune", drop=NOT_RESULT_SETTINGS),
            splits=config["splits"],
            label_set=label_set_settings(wildcards.label_set),
            model=config["model"],
            pretrain=section("pretrain", drop=("epochs", "epochs_per_job", "checkpoint_every")),
        ),
