"""Physical scales of the demo cohort, shared by the slides, the spots and the genes."""

from __future__ import annotations

REGION_TYPES = ("stroma", "tumour", "immune", "adipose")
MPP = 0.5  # µm per level-0 pixel of every demo slide
FIELD_UM = 2.0  # µm per pixel of the internal "truth" maps (region labels, nuclei)
OWN_RADIUS_UM = 35.0  # what is "inside" a spot: within the 112 µm view
RING_UM = (80.0, 220.0)  # the neighbourhood: outside the 112 µm view, inside 448 µm
SPOT_DIAMETER_UM = 55.0  # Visium
SPOT_PITCH_UM = 100.0  # Visium centre-to-centre distance
FIDUCIAL_DIAMETER_UM = 89.0  # Space Ranger reports about 1.6 spot diameters
EDGE_MARGIN_UM = 235.0  # no tissue this close to the border: 448 µm views fit
