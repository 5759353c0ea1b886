"""The benchmarks run against the installed packages and run end to end: no sys.path edits, no
imports from tests/, and the cheap settings of the ones that save figures go through every step
(a 28-minute hrv_weakening run once died at its save step, which no test ever reached)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def _sys_path_edits(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        # sys.path.insert / append / extend / ... and sys.path = ..., sys.path[...] = ...
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
            lines.append(node.lineno)
    return lines


def _test_imports(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "tests" or n.startswith("tests.") or n == "conftest" for n in names):
            lines.append(node.lineno)
    return lines


def _our_imports(tree: ast.AST) -> set[str]:
    ours = {"common", "activations", "sae", "analysis", "steering", "diffatlas", "toyworld"}
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops.add(node.module.split(".")[0])
    return tops & ours


def test_benchmarks__import_the_installed_packages_not_the_checkout_or_tests():
    assert len(BENCHMARKS) >= 15
    wheel = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.packages.find]")[1].split("\n\n")[0]
    bad = {}
    for path in BENCHMARKS:
        tree = ast.parse(path.read_text(), str(path))
        for what, lines in (("sys.path", _sys_path_edits(tree)), ("tests import", _test_imports(tree))):
            if lines:
                bad[f"{path.name} {what}"] = lines
        # with no checkout on sys.path, every package a benchmark imports must be one the wheel installs
        left_out = sorted(top for top in _our_imports(tree) if f'"{top}*"' not in wheel)
        if left_out:
            bad[f"{path.name} imports packages the wheel leaves out"] = left_out
    assert not bad, bad


def _run(script: str, *args: str, timeout: int = 120) -> dict:
    # the checkout under test first: the subprocess's sys.path otherwise starts at benchmarks/ and
    # imports whichever copy of the packages is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hrv_weakening__tiny_run_reaches_its_summary_and_saves_the_curves(tmp_path):
    last = _run("hrv_weakening.py", "--hrv-prompts", "40", "--images", "1", "--points", "5", "--steps", "2",
                "--concepts", "shape", "--out", str(tmp_path))
    assert isinstance(last["concepts"]["shape"]["area_between"], float)
    assert (tmp_path / "weakening_curves.png").stat().st_size > 0
    assert (tmp_path / "weakening.json").is_file()


def test_toy_fidelity__tiny_run_writes_its_grids_and_results(tmp_path):
    last = _run("toy_fidelity.py", "--one_object", "2", "--two_objects", "2", "--noise_captions", "1", "--noise_seeds", "2",
                "--steps", "2", "--batch_size", "2", "--out", str(tmp_path))
    assert last["n"] == 18 and set(last["one_object"]) >= {"color", "shape"}
    for name in ("samples.png", "noise_samples.png", "results.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_real_images__tiny_run_reports_reconstruction_and_each_edit(tmp_path):
    last = _run("real_images.py", "--scenes", "2", "--steps", "4", "--harvest-prompts", "16", "--select-prompts", "4",
                "--batch", "2", "--out", str(tmp_path))
    assert set(last["reconstruction"]) == {"shape", "color", "texture", "size", "position", "background", "style"}
    assert set(last["edits"]) == {"recolour", "striped", "move", "move_unsaid"}
    assert all(0 <= e["success"] <= 1 and 0 <= e["kept"] <= 1 for e in last["edits"].values())
    assert list(last)[-1] == "edits" and (tmp_path / "real_images.png").stat().st_size > 0


def test_steering_overhead__tiny_run_reports_idle_and_active_ratios(tmp_path):
    last = _run("steering_overhead.py", "--prompts", "1", "--steps", "1", "--repeats", "1", "--out", str(tmp_path))
    assert last["idle"] > 0 and last["active"] > 0


def test_claim_folder__a_rerun_of_the_same_settings_is_claimed_another_run_or_foreign_files_refused(tmp_path):
    from common.errors import UsageError
    from common.files import claim_folder

    out = tmp_path / "out"
    claim_folder(out, {"steps": 2})
    (out / "result.json").write_text("{}")
    claim_folder(out, {"steps": 2})  # the same run again: resumes or replaces its own files
    with pytest.raises(UsageError, match="holds another run's settings"):
        claim_folder(out, {"steps": 3})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.png").write_text("")
    with pytest.raises(UsageError, match=r"holds files of something else \(x.png\)"):
        claim_folder(tmp_path / "other", {"steps": 2})
    with pytest.raises(SystemExit, match="^bench.py: error: --out .* is a file"):
        claim_folder(out / "result.json", {"steps": 2}, prog="bench.py")


def test_benchmark__another_runs_out_folder_is_refused_in_one_line_before_any_work(tmp_path):
    (tmp_path / "run_args.json").write_text("{}")  # a run of other settings
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hrv_weakening.py"), "--out", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("hrv_weakening.py: error: --out") and "another run's settings" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_args.json"]


# -- --model toy-mmdit: the science benchmarks on the toy MMDiT ---------------------------------

MMDIT_WEIGHTS = ROOT / "toyworld" / "weights_mmdit" / "model_index.json"
needs_mmdit = pytest.mark.skipif(
    not MMDIT_WEIGHTS.exists(),
    reason="the toy MMDiT's weights (toyworld/weights_mmdit) are not bundled yet; train them with "
           "`python -m toyworld.train_mmdit --config configs/toyworld/train_mmdit.yaml`")


def test_benchmark_sites__each_declared_site_is_an_image_block_site_of_its_model():
    from toyworld.benchmarks import SITES, image_block_sites

    for model, sites in SITES.items():
        blocks = image_block_sites(model)  # the architecture, weights not needed
        assert sites["block"] in blocks and set(sites["blocks"]) <= set(blocks), model
    # the toy defaults are the ones the README's figures were measured at
    assert SITES["toy"] == {"block": "up_blocks.2.attentions.0",
                            "blocks": ["down_blocks.1.attentions.0", "up_blocks.2.attentions.0", "up_blocks.3.attentions.0"]}


def test_benchmark__a_site_the_model_lacks_is_refused_in_one_line_naming_its_block_sites(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "concept_recovery.py"), "--model", "toy-mmdit",
                          "--site", "up_blocks.2.attentions.0", "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    err = "\n".join(line for line in out.stderr.strip().splitlines() if not line.startswith("[transformers]"))
    assert out.returncode == 1 and err.count("\n") == 0, out.stderr
    assert err.startswith("concept_recovery.py: error: --site: 'up_blocks.2.attentions.0' is not a block site of model 'toy-mmdit'")
    assert "transformer_blocks.4" in err and not (tmp_path / "run").exists()


@needs_mmdit
def test_hrv_cost__tiny_run_on_the_toy_mmdit_names_the_model():
    last = _run("hrv_cost.py", "--model", "toy-mmdit", "--prompts", "4", "--steps", "2", "--repeats", "1", "--batch", "4")
    assert last["model"] == "toy-mmdit" and last["ratio"] > 0


@needs_mmdit
def test_composition__tiny_run_on_the_toy_mmdit_uses_its_sites(tmp_path):
    last = _run("composition.py", "--model", "toy-mmdit", "--prompts", "16", "--epochs", "1", "--out", str(tmp_path))
    assert last["model"] == "toy-mmdit"
    assert sorted(last["iou"]) == ["transformer_blocks.1", "transformer_blocks.3", "transformer_blocks.4"]


@needs_mmdit
def test_concept_recovery__tiny_run_on_the_toy_mmdit_attributes_by_total_effect(tmp_path):
    last = _run("concept_recovery.py", "--model", "toy-mmdit", "--prompts", "48", "--arms", "topk:8:2", "--epochs", "1",
                "--hrv-prompts", "4", "--examples", "2", "--out", str(tmp_path))
    assert last["model"] == "toy-mmdit" and last["site"] == "transformer_blocks.4" and last["attribution"] == "total"


def test_feature_stats_speed__tiny_run_reports_the_stats_overhead_before_the_headline():
    last = _run("feature_stats_speed.py", "--rows", "2048", "--d", "16", "--latents", "64", "--k", "4",
                "--chunk", "512", "--repeats", "1")
    assert list(last)[-2:] == ["ratio_spread", "ratio"] and last["stats_overhead"] > -1
    assert {"stats_over_encode", "encode_over_read", "gemm_over_read"} <= set(last)


def test_benchmarks__ctrl_c_is_one_line_and_rc_130(tmp_path):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # far more rows than are done before the signal: the run is still going when it comes
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "feature_stats_speed.py"), "--rows", "1000000",
                             "--repeats", "50"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert output.strip().splitlines() == ["feature_stats_speed.py: interrupted"], output


def test_many_saes__tiny_run_times_one_grid_against_separate_runs(tmp_path):
    last = _run("many_saes.py", "--prompts", "4", "--steps", "10", "--epochs", "1", "--repeats", "1", "--batch", "32",
                "--expansion", "2", "--k", "4", timeout=300)
    assert last["n_saes"] == 6 and last["grid_s"] > 0 and last["separate_s"] > 0
    assert list(last)[-1] == "many_over_single" and last["many_over_single"] > 0


def test_sae_quality__tiny_run_reaches_its_headline(tmp_path):
    last = _run("sae_quality.py", "--random-weights", "--prompts", "4", "--steps", "2", "--epochs", "1",
                "--batch", "32", "--expansion", "2", "--k", "4", "--recovered-images", "0", timeout=300)
    assert list(last) == ["fvu", "l0", "dead_fraction", "fraction_recovered", "model"] and last["l0"] <= 4


@pytest.mark.parametrize("value", ["0", "-2", "nan", "1e999"])
def test_many_saes__bad_numbers_are_one_line_before_any_work(value):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "many_saes.py"), "--repeats", value], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("many_saes.py: error: argument --repeats")
