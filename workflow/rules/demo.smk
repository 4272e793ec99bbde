# The synthetic demo cohort (config demo.enabled): the default workflow runs on it.
if config["demo"]["enabled"]:

    rule demo_cohort:
        output:
            demo_outputs(),
        log:
            "logs/demo_cohort/demo_cohort.log",
        benchmark:
            "benchmarks/results/demo_cohort.tsv"
        conda:
            "../../envs/slides.yaml"
        params:
            out=lambda w: DATA_ROOT,
            settings=as_json(demo_settings(config)),
        shell:
            "python -m m2ost demo-cohort --out {params.out:q} --settings {params.settings:q} 2> {log}"
