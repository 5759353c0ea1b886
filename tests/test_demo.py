import pytest


def test_demo__runs_the_chain_and_prints_where_it_wrote_each_result(tmp_path, capfd):
    pytest.importorskip("wandb")
    from diffatlas.cli import main
    from tests.test_quiet import assert_quiet

    code = main(["demo", "--out", str(tmp_path), "--num_images", "2", "--harvest_prompts", "4", "--sae_epochs", "1",
                 "--hrv_prompts", "2", "--features", "4", "--steer_images", "2"])
    out, err = capfd.readouterr()
    assert code == 0
    assert (tmp_path / "generated_grid.png").exists()
    assert "[1] generated 2 images" in out and "[2] harvested" in out and "[3] trained a TopK SAE" in out
    assert_quiet(out + err)  # our lines only (capfd: also what libraries write to the file descriptors)
    assert (tmp_path / "demo_config.yaml").exists()
    assert list((tmp_path / "sae").rglob("sae.safetensors"))
    assert "[4] head relevance vectors of 7 toy attributes x 52 heads" in out
    assert (tmp_path / "hrv" / "hrv_heatmap.png").exists()
    assert "[5] feature browser" in out and "HTML report (open from disk)" in out and "W&B run" in out
    assert (tmp_path / "features" / "index.html").exists() and list((tmp_path / "features" / "wandb").glob("offline-run-*"))
    assert "[6] steered 2 images of captions without a position" in out and "moved there: " in out
    assert (tmp_path / "steer" / "before_after.png").exists()
    assert (tmp_path / "steer" / "recipe.yaml").exists()


def test_demo__a_steering_quadrant_that_is_not_a_corner_is_refused_before_any_work(tmp_path, capsys):
    from diffatlas.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--steer_quadrant", "center"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffatlas demo: error: --steer_quadrant 'center' is not a quadrant; valid: top left")
    assert not (tmp_path / "d").exists()
