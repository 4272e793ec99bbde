"""The embedded synthetic demo cohort: H&E-like slides with Visium-style expression.

Nothing is downloaded: :func:`make_demo_cohort` draws every slide and count from a
seed. The generative model is built so that the multi-view idea of M2OST is
testable on a laptop:

* each slide has a tissue mask with an irregular border and four *region types*
  (stroma, tumour, immune, adipose) forming smooth blobs a few hundred µm across,
  each with its own stain colour, texture and density of nuclei;
* half of the genes respond to what lies **inside the spot** (region type and
  nucleus density within ``OWN_RADIUS_UM`` of the centre, visible in the 112 µm
  view), the other half to the **neighbourhood** (region composition in the ring
  ``RING_UM`` around the spot, visible only in the 224 / 448 µm views), and a few
  housekeeping genes are flat;
* counts are negative binomial around those rates, times a per-spot library size.

A model that sees all views should therefore beat one that sees the 112 µm view
only, which in turn beats the training-set mean. The ground truth (per-spot
features, gene roles and weights) is written under ``truth/`` so that tests and
notebooks can check that claim.

Layout written under ``out_dir``::

    samples.tsv                                sample sheet (paths relative to out_dir)
    README.md                                  what this folder is
    {sample}/image.tif                         pyramidal tiled TIFF, 0.5 µm/px
    {sample}/outs/filtered_feature_bc_matrix.h5    10x HDF5 v3 (in-tissue spots)
    {sample}/outs/spatial/tissue_positions.csv     Space Ranger >= 2.0 layout
    {sample}/outs/spatial/scalefactors_json.json
    {sample}/outs/spatial/tissue_hires_image.png, tissue_lowres_image.png
    truth/genes.tsv                            role and weights of every gene
    truth/{sample}_spots.tsv                   per-spot ground-truth features
    truth/{he_sample}_counts.tsv               hidden counts of the H&E-only slide

Every output is byte-identical for the same seed and paramete

Modules: :mod:`.params` (scales shared by all parts), :mod:`.slides` (tissue, regions, stain,
nuclei), :mod:`.spots` (the Visium grid and each spot's ground-truth features), :mod:`.genes`
(gene roles and counts), :mod:`.writers` (Space Ranger-style files), :mod:`.cohort` (the whole
cohort from one seed).
"""

from m2ost.data.demo.cohort import DemoCohort, make_demo_cohort
from m2ost.data.demo.params import MPP, OWN_RADIUS_UM, REGION_TYPES, RING_UM

__all__ = ["make_demo_cohort", "DemoCohort", "REGION_TYPES", "OWN_RADIUS_UM", "RING_UM", "MPP"]
