"""Tests for fileio.py: atomic writes keep the old file on error, leave no temp file, round-trip NIfTI."""
import nibabel as nib
import numpy as np
import pytest

from fileio import save_nifti_atomic, write_atomic, write_text_atomic


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.md"
    write_text_atomic(target, "old")

    def half_then_fail(f):
        f.write(b"new but half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_stale_temp_from_a_killed_writer_is_replaced(tmp_path):
    (tmp_path / ".a.json.tmp").write_bytes(b"{half")
    write_text_atomic(tmp_path / "a.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("name", ["m.nii.gz", "m.nii"])
def test_nifti_round_trip(tmp_path, name):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    save_nifti_atomic(nib.Nifti1Image(data, affine), tmp_path / name, level=1)
    img = nib.load(tmp_path / name)
    assert np.array_equal(np.asanyarray(img.dataobj), data) and img.get_data_dtype() == np.int16
    assert np.allclose(img.affine, affine)
    assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")  # gzip only for .gz
