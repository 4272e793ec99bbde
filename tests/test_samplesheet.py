from pathlib import Path

import pytest

from m2ost.errors import InputError
from m2ost.plan.samplesheet import read_sample_sheet

HEADER = "sample\tpatient\tslide\tformat\tcounts\tpositions\tmpp\n"


def write(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    path = tmp_path / "samples.tsv"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def test_reads_rows_and_resolves_paths(tmp_path):
    sheet = write(tmp_path, ["A\tP1\ta.svs\tvisium\tA/outs\t\t0.5", "B\tP1\tb.jpg\t\t\t\t"])
    a, b = read_sample_sheet(sheet, data_root=tmp_path / "root")
    assert a.slide == str(tmp_path / "root" / "a.svs")
    assert a.mpp == 0.5 and a.has_expression and not b.has_expression
    files = a.expression_files()
    assert files["counts"].endswith("A/outs/filtered_feature_bc_matrix.h5")
    assert files["positions"].endswith("A/outs/spatial/tissue_positions.csv")
    assert files["scalefactors"].endswith("A/outs/spatial/scalefactors_json.json")


@pytest.mark.parametrize("rows, message", [
    (["A\tP1\ta.svs\t\t\t\t", "A\tP2\tb.svs\t\t\t\t"], "duplicate sample name"),
    (["A\tP1\ta.svs\t\t\t\t", "B\tP2\ta.svs\t\t\t\t"], "already used by sample A"),
    (["A\tP1\ta.svs\tslideseq\tc.h5\t\t"], "unknown format"),
    (["A\tP1\ta.svs\t\t\t\tfast"], "is not a number"),
    (["A\tP1\ta.svs\tlegacy_st\tc.tsv\t\t"], "needs the spot selection table"),
    (["A b\tP1\ta.svs\t\t\t\t"], "must use letters"),
])
def test_bad_sheets_name_sample_and_problem(tmp_path, rows, message):
    sheet = write(tmp_path, rows)
    with pytest.raises(InputError, match=message) as err:
        read_sample_sheet(sheet, tmp_path)
    assert str(sheet) in str(err.value)


def test_missing_column(tmp_path):
    sheet = write(tmp_path, ["A\ta.svs"], header="sample\tslide\n")
    with pytest.raises(InputError, match="lacks column.*patient"):
        read_sample_sheet(sheet, tmp_path)
