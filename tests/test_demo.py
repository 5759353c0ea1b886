import pytest


def test_demo__runs_the_chain_and_prints_where_it_wrote_each_result(tmp_path, capfd):
    pytest.importorskip("wandb")
    import yaml

    from diffatlas.cli import main
    from tests.test_quiet import assert_quiet

    # middle, not the default early: the steering step must take its steps from the SAE, not say them again
    code = main(["demo", "--out", str(tmp_path), "--num_images", "2", "--harvest_prompts", "4", "--sae_epochs", "1",
                 "--sae_window", "middle", "--hrv_prompts", "2", "--features", "4", "--steer_images", "2"])
    out, err = capfd.readouterr()
    assert code == 0
    assert (tmp_path / "generated_grid.png").exists()
    assert "[1] generated 2 images" in out and "[2] harvested" in out and "[3] trained a TopK SAE" in out
    assert_quiet(out + err)  # our lines only (capfd: also what libraries write to the file descriptors)
    assert (tmp_path / "demo_config.yaml").exists()
    assert (tmp_path / "sae" / "up_blocks.2.attentions.0__middle" / "sae.safetensors").exists()
    assert "[3] trained a TopK SAE on up_blocks.2.attentions.0, middle steps" in out
    assert "[4] head relevance vectors of 7 toy attributes x 52 heads" in out
    assert (tmp_path / "hrv" / "hrv_heatmap.png").exists()
    assert "[5] feature browser" in out and "HTML report (open from disk)" in out and "W&B run" in out
    assert (tmp_path / "features" / "index.html").exists() and list((tmp_path / "features" / "wandb").glob("offline-run-*"))
    assert "[6] steered 2 images of captions without a position" in out and "moved there: " in out
    assert (tmp_path / "steer" / "before_after.png").exists()
    assert "at middle steps (the SAE's window)" in out
    (edit,) = yaml.safe_load((tmp_path / "steer" / "recipe.yaml").read_text())["interventions"]
    assert edit["when"] == "middle" and edit["sae"].endswith("up_blocks.2.attentions.0__middle")


def test_demo__trains_its_sae_on_the_early_steps_and_the_readme_names_that_folder():
    from pathlib import Path

    from diffatlas.demo import DemoConfig

    assert DemoConfig().sae_window == "early"  # where the noise decides the layout, which step 6 edits
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "diffatlas analyze features outputs/demo/sae/up_blocks.2.attentions.0__early outputs/demo/harvest" in readme
    assert "outputs/demo/sae/up_blocks.2.attentions.0 " not in readme


@pytest.mark.parametrize("args, says", [
    (["--steer_quadrant", "center"], "--steer_quadrant 'center' is not a quadrant; valid: top left"),
    (["--sae_window", "dawn"], "--sae_window: unknown timestep window 'dawn'; valid windows: early, middle, late"),
])
def test_demo__a_bad_quadrant_or_sae_window_is_refused_before_any_work(tmp_path, capsys, args, says):
    from diffatlas.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"diffatlas demo: error: {says}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "d").exists()
