"""Bad input to any ``diffatlas`` command is one line on stderr (exit 2); --debug shows the traceback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lightning.pytorch")

from activations.store import write_synthetic_store  # noqa: E402
from diffatlas.cli import main  # noqa: E402
from sae.synthetic import write_sparse_store  # noqa: E402

TRAIN = ["--trainer.logger", "false", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
         "--model.recovered.images", "0", "--model.init_samples", "64", "--model.sae.num_latents", "16",
         "--model.sae.k", "2"]


def _one_line_error(capsys, argv, needle) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"diffatlas {argv[0]}: error: ") and needle in err, err
    return err


@pytest.fixture
def store(tmp_path):
    write_sparse_store(tmp_path / "store", n=256, d=8, images=8, timesteps=(999, 500))
    return str(tmp_path / "store")


@pytest.mark.parametrize("args, needle", [
    (["--data.site", "nope"], "'nope'"),
    (["--data.window", "earlyish"], "'earlyish'"),
    (["--data.window", "[0.8, 0.2]"], "[0.8, 0.2]"),
    (["--data.window", "[0.5, 1.5]"], "[0.5, 1.5]"),
    (["--data.window", "{tau: [0.8, 0.2]}"], "0 <= lo < hi <= 1"),
    (["--data.window", "late"], "window='late'"),  # the store holds t = 999 and 500 only: no step in it
    (["--data.batch_size", "0"], "batch_size must be >= 1, got 0"),
    (["--data.branch", "foo"], "'foo'"),
    (["--trainer.max_epochs", "many"], "many"),  # a jsonargparse parse error: one line, not the usage
])
def test_bad_input__train_data_errors_are_one_line(store, tmp_path, capsys, args, needle):
    err = _one_line_error(capsys, ["train", "--data.store", store, "--trainer.default_root_dir", str(tmp_path / "r"),
                                   *TRAIN, *args], needle)
    if "window" in args[0] and "late" not in args:
        assert "early, middle, late" in err
    if "branch" in args[0]:
        assert "uncond, cond" in err  # activations.timesteps.BRANCHES, the store's order


def test_bad_input__train_on_an_empty_folder_or_a_0_row_store_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["train", "--data.store", str(tmp_path / "empty"), *TRAIN], str(tmp_path / "empty"))
    write_synthetic_store(tmp_path / "zero", "site", torch.zeros(0, 8),
                          {"image": np.zeros(0, int), "step": np.zeros(0, int), "t": np.zeros(0, int)})
    _one_line_error(capsys, ["train", "--data.store", str(tmp_path / "zero"), *TRAIN], "0 rows")


def test_bad_input__debug_flag_or_env_shows_the_traceback(store, monkeypatch):
    argv = ["train", "--data.store", store, "--data.window", "earlyish", *TRAIN]
    with pytest.raises(ValueError, match="earlyish"):
        main([*argv, "--debug"])
    monkeypatch.setenv("DIFFATLAS_DEBUG", "1")
    with pytest.raises(ValueError, match="earlyish"):
        main(argv)


def test_bad_input__generate_parse_error_is_one_line(capsys):
    _one_line_error(capsys, ["generate", "--steps", "lots"], "lots")
