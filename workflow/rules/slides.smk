# Spot tables, slide preparation, multi-view tiling into HDF5 bundles, and the spot grid of H&E-only slides.


rule spots:
    input:
        unpack(spots_inputs),
    output:
        outputs.SPOTS,
    log:
        "logs/spots/{sample}.log",
    wildcard_constraints:
        sample=_alternatives(ST_SAMPLES),
    conda:
        "../../envs/slides.yaml"
    params:
        fmt=lambda w: SAMPLES[w.sample].format,
        flag=spots_flag(config),
        scalefactors=scalefactors_arg,
        geometry=geometry_args,
    shell:
        "python -m m2ost spots --sample {wildcards.sample} --format {params.fmt} --positions {input.positions:q} "
        "{params.scalefactors} {params.geometry} {params.flag} --out {output:q} 2> {log}"


rule prepare_slide:
    input:
        unpack(prepare_inputs),
    output:
        outputs.SLIDE_INFO,
    log:
        "logs/prepare_slide/{sample}.log",
    wildcard_constraints:
        sample=_alternatives(set(SAMPLES) - set(PLAIN_SLIDES)),
    conda:
        "../../envs/slides.yaml"
    params:
        args=prepare_args,
        mpp=lambda w: SAMPLES[w.sample].mpp,
        settings=as_json(prepare_settings(config)),
    shell:
        "python -m m2ost prepare-slide --sample {wildcards.sample} --slide {input.slide:q} {params.args} "
        "--settings {params.settings:q} --out {output:q} 2> {log}"


rule convert_slide:
    input:
        unpack(prepare_inputs),
    output:
        info=outputs.SLIDE_INFO,
        pyramid=outputs.PYRAMID,
    log:
        "logs/convert_slide/{sample}.log",
    benchmark:
        "benchmarks/results/convert_slide/{sample}.tsv"
    wildcard_constraints:
        sample=_alternatives(PLAIN_SLIDES),
    conda:
        "../../envs/slides.yaml"
    params:
        args=prepare_args,
        mpp=lambda w: SAMPLES[w.sample].mpp,
        settings=as_json(convert_settings(config)),
    shell:
        "python -m m2ost convert-slide --sample {wildcards.sample} --slide {input.slide:q} {params.args} "
        "--converted {output.pyramid:q} --settings {params.settings:q} --out {output.info:q} 2> {log}"


rule tile:
    input:
        slide=readable_slide,
        info=outputs.SLIDE_INFO,
        spots=outputs.SPOTS,
    output:
        outputs.BUNDLE,
    log:
        "logs/tile/{sample}.log",
    benchmark:
        "benchmarks/results/tile/{sample}.tsv"
    conda:
        "../../envs/slides.yaml"
    threads: config["tiling"]["threads"]
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        settings=as_json(tile_settings(config)),
    shell:
        "python -m m2ost tile --sample {wildcards.sample} --slide-info {input.info:q} --spots {input.spots:q} "
        "--settings {params.settings:q} --workers {threads} --no-progress --out {output:q} 2> {log}"


rule grid_spots:
    input:
        info=outputs.SLIDE_INFO,
    output:
        outputs.SPOTS,
    log:
        "logs/grid_spots/{sample}.log",
    wildcard_constraints:
        sample=_alternatives(HE_SAMPLES),
    conda:
        "../../envs/slides.yaml"
    params:
        settings=as_json(grid_settings(config)),
    shell:
        "python -m m2ost grid-spots --sample {wildcards.sample} --slide-info {input.info:q} --settings {params.settings:q} "
        "--out {output:q} 2> {log}"
