# Per label set: every shard's predictions (the batch folders of rule predict) gathered into one
# HATS catalogue (LSDB, hats, astropy open it) and its margin cache, with a summary and a sky map for the
# report.


rule catalog:
    input:
        predictions=lambda wildcards: batch_folders(
            "predict", f"{RESULTS}/predict/{wildcards.label_set}"
        ),
    output:
        dataset=directory(f"{RESULTS}/catalog/{{label_set}}"),
        margin=directory(f"{RESULTS}/catalog/{{label_set}}_margin"),
        summary=report(
            f"{RESULTS}/catalog/{{label_set}}.summary.json",
            caption="../report/catalog_summary.rst",
            category="4. Catalogue",
            subcategory="{label_set}",
            labels={"label set": "{label_set}", "file": "summary"},
        ),
        skymap=report(
            f"{RESULTS}/catalog/{{label_set}}.skymap.png",
            caption="../report/skymap.rst",
            category="4. Catalogue",
            subcategory="{label_set}",
            labels={"label set": "{label_set}", "file": "sky map"},
        ),
        kiel=report(
            f"{RESULTS}/catalog/{{label_set}}.kiel.png",
            caption="../report/kiel.rst",
            category="4. Catalogue",
            subcategory="{label_set}",
            labels={"label set": "{label_set}", "file": "Kiel diagram"},
        ),
        distributions=report(
            f"{RESULTS}/catalog/{{label_set}}.distributions.png",
            caption="../report/distributions.rst",
            category="4. Catalogue",
            subcategory="{label_set}",
            labels={"label set": "{label_set}", "file": "distributions"},
        ),
    log:
        f"{LOGS}/catalog/{{label_set}}.log",
    benchmark:
        f"{BENCHMARKS}/catalog/{{label_set}}.tsv"
    priority: CATALOGUE_PRIORITY
    conda:
        MSA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=attempt_scaled(60),
    params:
        config=MSA_CONFIG,
        settings=settings(catalog=config["catalog"]),
    shell:
        "msa catalog --config {params.config:q} --label-set {wildcards.label_set:q} "
        "--inputs {input.predictions:q} --out-dir {output.dataset:q} --margin {output.margin:q} "
        "--summary {output.summary:q} "
        "--skymap {output.skymap:q} --kiel {output.kiel:q} --distributions {output.distributions:q} "
        "> {log:q} 2>&1"


# The results table that leads the report's front page (workflow/report/workflow.rst includes it).
rule front_page:
    input:
        evaluation=f"{RESULTS}/evaluate/{{label_set}}",
        summary=f"{RESULTS}/catalog/{{label_set}}.summary.json",
        kiel=f"{RESULTS}/catalog/{{label_set}}.kiel.png",
        skymap=f"{RESULTS}/catalog/{{label_set}}.skymap.png",
    output:
        table=f"{RESULTS}/report/{{label_set}}.results.rst",
    log:
        f"{LOGS}/report/{{label_set}}.log",
    conda:
        MSA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=attempt_scaled(10),
    params:
        config=MSA_CONFIG,
    shell:
        "msa front-page --config {params.config:q} --label-set {wildcards.label_set:q} --metrics {input.evaluation:q}/metrics.json "
        "--summary {input.summary:q} --figures {input.kiel:q} {input.skymap:q} --out {output.table:q} "
        "> {log:q} 2>&1"
