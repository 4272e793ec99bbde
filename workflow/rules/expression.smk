# Expression matrices (QC, normalisation) and the gene panel of each split.


rule expression:
    input:
        counts=lambda w: source_file(w.sample, "counts"),
        spots=outputs.SPOTS,
        # the H&E thumbnail of uns["spatial"] (for scanpy/squidpy) is read from the slide
        info=outputs.SLIDE_INFO,
        slide=readable_slide,
    output:
        outputs.EXPRESSION,
    log:
        "logs/expression/{sample}.log",
    benchmark:
        "benchmarks/results/expression/{sample}.tsv"
    conda:
        "../../envs/expression.yaml"
    resources:
        mem_mb=4000,
    params:
        fmt=lambda w: SAMPLES[w.sample].format,
        settings=as_json(expression_settings(config)),
    shell:
        "python -m m2ost expression --sample {wildcards.sample} --format {params.fmt} --counts {input.counts:q} "
        "--spots {input.spots:q} --slide-info {input.info:q} --settings {params.settings:q} --out {output:q} 2> {log}"


rule panel:
    input:
        train=lambda w: expression_files(split_samples(w.split)[0]),
        other=lambda w: expression_files(split_samples(w.split)[1]),
        genes=panel_settings(config)["list_file"] or [],
    output:
        outputs.PANEL,
    log:
        "logs/panel/{split}.log",
    conda:
        "../../envs/expression.yaml"
    params:
        train=lambda w: pairs(split_samples(w.split)[0], "expression"),
        other=lambda w: pairs(split_samples(w.split)[1], "expression"),
        settings=as_json(panel_settings(config)),
    shell:
        "python -m m2ost panel --train {params.train} --other {params.other} --settings {params.settings:q} "
        "--out {output:q} 2> {log}"


rule data_summary:
    input:
        expression_files(ST_SAMPLES),
    output:
        table=report(
            outputs.DATA_SUMMARY,
            caption="../report/data_summary.rst",
            category="Data quality",
            labels={"content": "table (TSV, for a spreadsheet)"},
        ),
        html=report(
            outputs.DATA_SUMMARY_HTML,
            caption="../report/data_summary.rst",
            category="Data quality",
            labels={"content": "table"},
        ),
    log:
        "logs/data_summary/data_summary.log",
    conda:
        "../../envs/expression.yaml"
    params:
        expression=pairs(ST_SAMPLES, "expression"),
        low=data_summary_settings(config)["low_library_fraction"],
    shell:
        "python -m m2ost data-summary --expression {params.expression} --low-fraction {params.low} "
        "--out {output.table:q} --html {output.html:q} 2> {log}"
