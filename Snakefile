# m2ost: multi-scale H&E views -> spatial transcriptomics with M2OST.
# Thin entry point: configuration, validation, then one rule file per stage.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


validate(config, "m2ost/schemas/config.schema.yaml", set_default=True)


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/slides.smk"
include: "workflow/rules/expression.smk"
include: "workflow/rules/model.smk"


rule all:
    default_target: True
    input:
        all_targets(),
