"""Results folders are probed before the work that fills them (issue #21)."""
import errno
import os

import pytest

from diffusiondet.engine import output_check
from diffusiondet.engine.output_check import OutputNotWritableError, check_writable_dir
from tests.drill import evaluation as drill


def test_a_writable_folder_is_created_and_left_empty(tmp_path):
    folder = tmp_path / "a" / "b"
    check_writable_dir(str(folder), "results")
    assert folder.is_dir() and os.listdir(folder) == []


def test_a_full_disk_is_an_error_naming_the_folder(tmp_path, monkeypatch):
    # /dev/full fails every write with ENOSPC, as a full disk does.
    monkeypatch.setattr(output_check.tempfile, "NamedTemporaryFile", lambda **kw: open("/dev/full", "wb"))
    with pytest.raises(OutputNotWritableError, match="cannot write the results to .*" + str(tmp_path)) as info:
        check_writable_dir(str(tmp_path), "the results")
    assert info.value.errno == errno.ENOSPC


def test_a_path_under_a_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "inference").write_text("")
    folder = str(tmp_path / "inference" / "val")
    with pytest.raises(OutputNotWritableError, match=folder):
        check_writable_dir(folder, "results")


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_trainer_test_stops_before_the_inference(tmp_path, fault):
    # The drill case evaluates a registered dataset with a model that counts its calls.
    assert "before any inference" in drill.results_folder_not_writable(str(tmp_path), fault)
