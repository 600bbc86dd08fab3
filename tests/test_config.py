"""Settings: typed overrides, loud failures, profiles; run_pipeline's command-line face."""
import subprocess
import sys
from pathlib import Path

import pytest

import config
import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_applied():
    profile, applied = config.configure(["--EPOCHS=5", "PATCH_SIZE=96,96,96", "--AUGMENT=false", "--LR=0.01",
                                         "--PROFILE=cpu"])
    assert profile == "cpu"
    assert (config.EPOCHS, config.PATCH_SIZE, config.AUGMENT, config.LR) == (5, (96, 96, 96), False, 0.01)
    assert config.TARGET_SPACING == config.PROFILES["cpu"]["TARGET_SPACING"]  # profile under the overrides
    assert applied["EPOCHS"] == 5


def test_name_lists_take_any_number_of_names():
    config.apply_overrides(["--PRESENCE_MIRROR_ORGANS="])
    assert config.PRESENCE_MIRROR_ORGANS == ()
    config.apply_overrides(["--PRESENCE_MIRROR_ORGANS=prostate, bladder"])
    assert config.PRESENCE_MIRROR_ORGANS == ("prostate", "bladder")
    with pytest.raises(config.SettingError, match="expected tuple"):  # sizes keep their length
        config.apply_overrides(["--PATCH_SIZE=64,64"])


def test_output_root_moves_every_output_folder(tmp_path):
    config.apply_overrides([f"OUTPUT_ROOT={tmp_path}", f"LOG_DIR={tmp_path / 'elsewhere'}"])
    assert config.CHECKPOINT_DIR == tmp_path / "checkpoints" and config.EVAL_DIR == tmp_path / "evaluation_results"
    assert config.LOG_DIR == tmp_path / "elsewhere"


@pytest.mark.parametrize("pair, message", [("EPOCHS=oops", "expected int"), ("NO_SUCH=1", "no such setting"),
                                           ("PATCH_SIZE=64,64", "expected tuple"), ("AMP=maybe", "expected bool"),
                                           ("EPOCHS", "expected --NAME=value"), ("PROFILES=1", "no such setting")])
def test_bad_overrides_fail_loudly(pair, message):
    with pytest.raises(config.SettingError, match=message):
        config.configure([pair])


def test_settings_are_json_friendly():
    import json
    s = config.settings()
    json.dumps(s)
    assert s["ORGANS"] == list(config.ORGANS) and "PROFILES" not in s


@pytest.mark.parametrize("arg", ["--EPOCHS=oops", "--NO_SUCH=1"])
def test_cli_bad_setting_is_one_line_exit_2(arg):
    result = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--train", arg],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and arg.split("=")[0] in result.stderr


def test_missing_data_root_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_atlas"
    code = run_pipeline.main(["--preprocess", f"--data-root={missing}", f"--OUTPUT_ROOT={tmp_path}"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "does not exist" in err


def test_help_explains_overrides():
    result = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--NAME=value" in result.stdout and "--analyze" in result.stdout
