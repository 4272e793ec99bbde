# Training, evaluation, the summary table, and prediction on H&E-only slides.

rule embed:
    input:
        bundle="results/bundles/{sample}.h5",
        weights=encoder_weights,
    output:
        "results/embeddings/{encoder}/{sample}.h5",
    params:
        settings=as_json({"encoder": encoder_config(), "device": config["train"]["device"]}),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    log:
        "logs/embed/{encoder}/{sample}.log",
    benchmark:
        "benchmarks/results/embed/{encoder}/{sample}.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m m2ost embed --bundle {input.bundle:q} --sample {wildcards.sample} --settings {params.settings:q} "
        "--out {output:q} 2> {log}"


rule train:
    input:
        bundles=lambda w: bundle_files(split_samples(w.split)[0]),
        expression=lambda w: expression_files(split_samples(w.split)[0]),
        embeddings=train_embeddings,
        genes="results/genes/{split}.txt",
    output:
        "results/models/{model}/{split}/model.pt",
    params:
        bundles=lambda w: pairs(split_samples(w.split)[0], "bundle"),
        expression=lambda w: pairs(split_samples(w.split)[0], "expression"),
        embeddings=embeddings_arg,
        settings=lambda w: as_json(train_settings(w.model)),
        launcher=train_launcher,
        out_dir=lambda w, output: os.path.dirname(output[0]),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=720,
    log:
        "logs/train/{model}/{split}.log",
    benchmark:
        "benchmarks/results/train/{model}/{split}.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.launcher} -m m2ost train --kind {wildcards.model} --bundle {params.bundles} --expression {params.expression} "
        "{params.embeddings} --genes {input.genes:q} --settings {params.settings:q} --out-dir {params.out_dir:q} 2> {log}"


rule evaluate:
    input:
        model="results/models/{model}/{split}/model.pt",
        bundles=lambda w: bundle_files(split_samples(w.split)[1]),
        expression=lambda w: expression_files(split_samples(w.split)[1]),
        embeddings=test_embeddings,
    output:
        summary="results/metrics/{model}/{split}/summary.json",
        predictions="results/metrics/{model}/{split}/predictions.h5ad",
        per_gene=directory("results/metrics/{model}/{split}/per_gene"),
        figures=report(
            directory("results/metrics/{model}/{split}/figures"),
            patterns=["{name}.png"],
            caption="../report/evaluation.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "split": "{split}", "figure": "{name}"},
        ),
    params:
        bundles=lambda w: pairs(split_samples(w.split)[1], "bundle"),
        expression=lambda w: pairs(split_samples(w.split)[1], "expression"),
        embeddings=test_embeddings_arg,
        settings=as_json(eval_settings()),
        out_dir=lambda w, output: os.path.dirname(output.summary),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    log:
        "logs/evaluate/{model}/{split}.log",
    benchmark:
        "benchmarks/results/evaluate/{model}/{split}.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m m2ost evaluate --model {input.model:q} --bundle {params.bundles} --expression {params.expression} "
        "{params.embeddings} --name {wildcards.model} --split {wildcards.split} --settings {params.settings:q} "
        "--out-dir {params.out_dir:q} 2> {log}"


rule summary:
    input:
        summary_files(),
    output:
        report("results/metrics/summary.tsv", caption="../report/summary.rst", category="Summary"),
    log:
        "logs/summary/summary.log",
    conda:
        "../../envs/expression.yaml"
    shell:
        "python -m m2ost summary {input:q} --out {output:q} 2> {log}"


rule grid_spots:
    input:
        info="results/slides/{sample}.json",
    output:
        "results/spots/{sample}.tsv",
    wildcard_constraints:
        sample=_alternatives(HE_SAMPLES),
    params:
        settings=as_json({k: config["predict"][k] for k in ("spot_spacing_um", "min_tissue_fraction")}),
    log:
        "logs/grid_spots/{sample}.log",
    conda:
        "../../envs/slides.yaml"
    shell:
        "python -m m2ost grid-spots --sample {wildcards.sample} --slide-info {input.info:q} --settings {params.settings:q} "
        "--out {output:q} 2> {log}"


rule predict:
    input:
        model=f"results/models/{config['predict']['model']}/{PREDICT_SPLIT}/model.pt",
        bundle="results/bundles/{sample}.h5",
    output:
        h5ad="results/predictions/{sample}.h5ad",
        png=report("results/predictions/{sample}.png", caption="../report/prediction.rst", category="Prediction"),
    wildcard_constraints:
        sample=_alternatives(HE_SAMPLES),
    params:
        settings=as_json(predict_settings()),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    log:
        "logs/predict/{sample}.log",
    benchmark:
        "benchmarks/results/predict/{sample}.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m m2ost predict --model {input.model:q} --bundle {input.bundle:q} --sample {wildcards.sample} "
        "--settings {params.settings:q} --out {output.h5ad:q} --png {output.png:q} 2> {log}"


