# Training, evaluation, the summary table, and prediction on H&E-only slides.


rule embed:
    input:
        bundle=outputs.BUNDLE,
        weights=encoder_weights,
    output:
        outputs.EMBEDDINGS,
    log:
        "logs/embed/{encoder}/{sample}.log",
    benchmark:
        "benchmarks/results/embed/{encoder}/{sample}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=as_json(embed_settings(config)),
    shell:
        "python -m m2ost embed --bundle {input.bundle:q} --sample {wildcards.sample} --settings {params.settings:q} "
        "--out {output:q} 2> {log}"


rule train:
    input:
        bundles=lambda w: bundle_files(split_samples(w.split)[0]),
        expression=lambda w: expression_files(split_samples(w.split)[0]),
        embeddings=train_embeddings,
        weights=train_weights,
        genes=outputs.PANEL,
        members=lambda w: list(member_models(w).values()),
    output:
        outputs.MODEL,
    log:
        "logs/train/{model}/{split}.log",
    benchmark:
        "benchmarks/results/train/{model}/{split}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=720,
    params:
        bundles=lambda w: pairs(split_samples(w.split)[0], "bundle"),
        expression=lambda w: pairs(split_samples(w.split)[0], "expression"),
        embeddings=embeddings_arg,
        members=members_arg,
        settings=lambda w: as_json(train_settings(w.model, config)),
        launcher=lambda w: train_launcher(w.model, config),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    shell:
        "{params.launcher} -m m2ost train --kind {wildcards.model} --bundle {params.bundles} --expression {params.expression} "
        "{params.embeddings} {params.members} --genes {input.genes:q} --settings {params.settings:q} --out-dir {params.out_dir:q} --restart-stale-checkpoint 2> {log}"


rule evaluate:
    input:
        model=outputs.MODEL,
        bundles=lambda w: bundle_files(split_samples(w.split)[1]),
        expression=lambda w: expression_files(split_samples(w.split)[1]),
        embeddings=test_embeddings,
    output:
        summary=outputs.evaluation("summary"),
        predictions=outputs.evaluation("predictions"),
        per_gene=directory(outputs.evaluation("per_gene")),
        # Every held-out sample has the same figures (maps, genes), so each combination of the
        # labels the report offers exists; the split is part of the sample's label, not a label
        # of its own (a split holds only its own held-out samples).
        figures=report(
            directory(outputs.evaluation("figures")),
            patterns=["{sample}.{figure}.jpg", "{sample}.{figure}.png"],
            caption="../report/evaluation.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"held-out sample": "{sample} ({split})", "figure": "{figure}"},
        ),
        qupath=directory(outputs.evaluation("qupath")),
    log:
        "logs/evaluate/{model}/{split}.log",
    benchmark:
        "benchmarks/results/evaluate/{model}/{split}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        bundles=lambda w: pairs(split_samples(w.split)[1], "bundle"),
        expression=lambda w: pairs(split_samples(w.split)[1], "expression"),
        embeddings=test_embeddings_arg,
        settings=as_json(eval_settings(config)),
        out_dir=lambda w, output: os.path.dirname(output.summary),
    shell:
        "python -m m2ost evaluate --model {input.model:q} --bundle {params.bundles} --expression {params.expression} "
        "{params.embeddings} --name {wildcards.model} --split {wildcards.split} --settings {params.settings:q} "
        "--out-dir {params.out_dir:q} 2> {log}"


rule summary:
    input:
        summaries=summary_files(),
        per_gene=[os.path.join(os.path.dirname(f), "per_gene") for f in summary_files()],
    output:
        table=report(
            outputs.SUMMARY_TABLE,
            caption="../report/summary.rst",
            category="Summary",
            labels={"content": "table (TSV, for a spreadsheet)"},
        ),
        html=report(
            outputs.SUMMARY_HTML,
            caption="../report/summary.rst",
            category="Summary",
            labels={"content": "table"},
        ),
        png=report(
            outputs.SUMMARY_FIGURE,
            caption="../report/comparison.rst",
            category="Summary",
            labels={"content": "per-gene PCC of every model"},
        ),
    log:
        "logs/summary/summary.log",
    conda:
        "../../envs/expression.yaml"
    shell:
        "python -m m2ost summary {input.summaries:q} --out {output.table:q} --html {output.html:q} "
        "--png {output.png:q} 2> {log}"


rule predict:
    input:
        model=predict_model,
        bundle=outputs.BUNDLE,
    output:
        h5ad=outputs.PREDICTION,
        png=report(
            outputs.PREDICTION_MAP,
            caption="../report/prediction.rst",
            category="Prediction",
            labels={
                "slide": "{sample}",
                "model": PREDICT_MODEL_FILE or f"{config['predict']['model']} (split {PREDICT_SPLIT})",
            },
        ),
        geojson=outputs.PREDICTION_GEOJSON,
    log:
        "logs/predict/{sample}.log",
    benchmark:
        "benchmarks/results/predict/{sample}.tsv"
    wildcard_constraints:
        sample=_alternatives(HE_SAMPLES),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=as_json(predict_settings(config)),
    shell:
        "python -m m2ost predict --model {input.model:q} --bundle {input.bundle:q} --sample {wildcards.sample} "
        "--settings {params.settings:q} --out {output.h5ad:q} --png {output.png:q} --geojson {output.geojson:q} 2> {log}"
