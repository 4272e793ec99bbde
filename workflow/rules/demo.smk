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
            out=lambda w, output: os.path.commonpath(output),
            seed=config["demo"]["seed"],
            settings=as_json({k: v for k, v in config["demo"].items() if k not in ("enabled", "seed")}),
        shell:
            "python -m m2ost demo-cohort --out {params.out:q} --seed {params.seed} --settings {params.settings:q} 2> {log}"
