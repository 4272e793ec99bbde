"""Multi-view tiling: for every spot, V square views centred on it, written to one HDF5 bundle.

Each view has a field of view (µm, or level-0 px) and an output size (px). It is read from
the pyramid level whose downsample is the largest one not above the needed downsample, then
resized with antialiasing, so a 448-µm view of a 40x slide decodes 16x fewer pixels than
reading level 0 and shrinking (what the authors did; kept here as ``strategy="naive"`` for
the benchmark and the equivalence test).

Speed comes from decoding each slide tile once and doing little else per pixel:

- When OpenSlide reads the slide as a plain tiled TIFF (``generic-tiff``: our converted
  pyramids; ``aperio``: SVS) the tiles are read and decoded directly (tifffile's decoder,
  libjpeg-turbo through imagecodecs) and views are cut from them in numpy. OpenSlide's
  ``read_region`` costs several times the decode in cairo compositing and colour
  conversion. The direct reader checks itself against OpenSlide when it opens and steps
  aside for OpenSlide on any disagreement; every other format is read through OpenSlide.
- Spots are processed in thin horizontal bands, alternately left to right and right to
  left, and every decoded tile is dropped as soon as the last view that needs it has been
  cut (reference counts computed up front), with a byte cap as a backstop, so memory stays
  flat whatever the slide size.
- Workers (processes) own contiguous runs of bands and cut the views straight into shared
  memory; the writer process only moves bytes into the file (whole-chunk writes). The
  tissue fraction and the per-spot digest are computed by the workers.

Modules: :mod:`.views` (what a view is, which level it is read from), :mod:`.reader` (the
direct TIFF reader, OpenSlide otherwise, one view), :mod:`.parallel` (spots in bands over
worker processes), :mod:`.tile` (a slide's spots into a bundle).
"""

from m2ost.data.tiling.parallel import tissue_fraction
from m2ost.data.tiling.reader import TiffTileReader, open_reader, read_view
from m2ost.data.tiling.tile import tile_slide
from m2ost.data.tiling.views import ReadPlan, View, plan_views

__all__ = ["ReadPlan", "TiffTileReader", "View", "open_reader", "plan_views", "read_view", "tile_slide",
           "tissue_fraction"]
