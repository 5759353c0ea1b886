"""Bad input to any ``diffatlas`` command is one line on stderr (exit 2); --debug shows the traceback."""

from __future__ import annotations

from pathlib import Path

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


# ---- one parser, one error path, one Ctrl-C for every command (issue 21) -------------------------

@pytest.mark.parametrize("argv, where", [
    (["harvest", "configs/harvest/toy.yaml", "--bogus", "1"], "harvest"),
    (["sites", "toy", "--bogus"], "sites"),
    (["analyze", "hrv", "--bogus", "1"], "analyze hrv"),
    (["analyze", "weaken", "--bogus", "1"], "analyze weaken"),
    (["steer", "--bogus", "1"], "steer"),
])
def test_bad_flag__one_line_not_the_usage_for_every_command(capsys, argv, where):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"diffatlas {where}: error: unrecognized arguments: {' '.join(argv[-2:] if argv[-1] == '1' else argv[-1:])}"


@pytest.mark.parametrize("argv, where, needle", [
    (["sites"], "sites", "give a model"),
    (["sites", "sd-9"], "sites", "unknown model config 'sd-9'"),
    (["analyze", "plot"], "analyze", "valid subcommands: hrv, weaken, features"),
    (["analyze", "features"], "analyze features", "give the SAE folder and the store"),
])
def test_command_errors__printed_once_by_the_dispatcher(capsys, argv, where, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"diffatlas {where}: error: ") and needle in err, err


def test_harvest_bad_number__line_says_error(capsys):
    _one_line_error(capsys, ["harvest", "configs/harvest/toy.yaml", "--num_inference_steps", "0"],
                    "--num_inference_steps must be an integer >= 1 and <= 1000, got 0")


@pytest.mark.parametrize("bug", [ValueError("an internal shape check"), KeyError("an internal table")])
def test_internal_value_or_key_error__keeps_its_traceback(monkeypatch, bug):
    import analysis.construct

    def load_model(cfg, name):
        raise bug

    monkeypatch.setattr(analysis.construct, "load_model", load_model)
    with pytest.raises(type(bug)):
        main(["analyze", "hrv", "--wandb", "false"])


def test_user_error_types__a_usage_error_is_still_a_value_error_and_an_unknown_name_a_key_error(random_toy_pipe):
    from activations.sites import list_sites, resolve_sites
    from common.errors import UnknownNameError, UsageError, user_error_types

    assert ValueError not in user_error_types() and KeyError not in user_error_types()
    with pytest.raises(KeyError) as err:
        resolve_sites(list_sites(random_toy_pipe.unet), ["nope"])
    assert isinstance(err.value, UnknownNameError) and isinstance(err.value, UsageError)
    assert str(err.value).startswith("unknown site 'nope'")  # not KeyError's quoted repr


def test_user_error_types__the_checks_merged_from_main_raise_usage_errors(random_toy_pipe, tmp_path):
    """Window/gate spellings, recipe fields, the SAE fit check, concept lists, HRV progress files and
    schedulers are user input: UsageError (one line), not a plain ValueError (a traceback)."""
    from activations.pipeline import set_scheduler
    from activations.timesteps import parse_when, window_bounds
    from analysis.concepts import check_concepts
    from analysis.construct import _read_progress
    from common.errors import UsageError
    from sae.config import SparseCoderConfig
    from sae.registry import get_architecture
    from sae.splice import check_sae_fits
    from steering.recipe import Recipe

    sae = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 5)  # a width no site has
    (tmp_path / "progress.safetensors").write_text("not safetensors")
    bad = [
        lambda: parse_when("sometime"),
        lambda: window_bounds("all"),
        lambda: Recipe.from_dict({"model": "toy", "prompts": ["a red cat"], "seeds": [0], "steps": None,
                                  "guidance": None, "interventions": [], "colour": 1}),
        lambda: Recipe.from_dict({"model": "toy", "prompts": ["a red cat"], "seeds": [0], "steps": 0,
                                  "guidance": None, "interventions": []}),
        lambda: check_sae_fits(sae, random_toy_pipe, site="mid_block.attentions.0"),
        lambda: check_concepts(["a", "b"], [["red"], ["red"]]),
        lambda: _read_progress(tmp_path / "progress.safetensors", {}),
        lambda: set_scheduler(random_toy_pipe, "NopeScheduler"),
    ]
    for k, call in enumerate(bad):
        with pytest.raises(UsageError):
            call()


@pytest.mark.parametrize("argv, patch", [
    (["analyze", "hrv", "--wandb", "false"], ("analysis.construct", "load_model")),
    (["steer", "recipe.yaml"], ("steering.cli", "steer_recipe")),
    (["sites", "toy"], ("activations.sites", "list_sites")),
])
def test_ctrl_c__one_line_and_exit_130_for_every_command(monkeypatch, capsys, argv, patch):
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(patch[0]), patch[1], interrupted)
    try:
        assert main(argv) == 130
    except KeyboardInterrupt:  # escaping would stop the test session, not fail this test
        pytest.fail("Ctrl-C escaped the dispatcher (a traceback)")
    err = capsys.readouterr().err
    where = " ".join(argv[:2]) if argv[0] == "analyze" else argv[0]
    assert err == f"diffatlas {where}: interrupted\n", err


def test_analyze_hrv__a_list_of_prompts_is_used_whole(tmp_path):
    from analysis.config import HRVConfig
    from analysis.construct import prompt_texts
    from common.config import parse

    texts = [f"a red circle at the {p}" for p in ("top left", "top right", "bottom left", "bottom right")] * 2
    path = tmp_path / "hrv.yaml"
    path.write_text(yaml_dump({"prompts": {"kind": "list", "texts": texts}}))
    cfg = parse(HRVConfig, [str(path)], "diffatlas analyze hrv", positional=("config",))
    assert cfg.prompts.num_prompts is None and prompt_texts(cfg) == texts
    three = parse(HRVConfig, [str(path), "--prompts.num_prompts", "3"], "diffatlas analyze hrv", positional=("config",))
    assert prompt_texts(three) == texts[:3]
    assert parse(HRVConfig, [], "diffatlas analyze hrv").prompts.num_prompts == 64  # the toyworld default stays


def yaml_dump(data) -> str:
    import yaml

    return yaml.safe_dump(data)


@pytest.mark.parametrize("argv, says", [
    (["hrv", "--steps=0"], "--steps must be an integer >= 1 and <= 1000, got 0"),
    (["hrv", "--steps=-2"], "--steps must be an integer >= 1 and <= 1000, got -2"),
    (["hrv", "--steps=1000000000"], "--steps must be an integer >= 1 and <= 1000, got 1000000000"),
    (["hrv", "{guidance: .nan}"], "--guidance must be a finite number >= 0, got nan"),  # a YAML NaN parses
    (["hrv", "--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (["hrv", "--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
    (["hrv", "--prompts.num_prompts", "0"], "--prompts.num_prompts must be an integer >= 1, got 0"),
    (["hrv", "--seeds", "[0, -1]"], "--seeds must be an integer >= 0 and <= 9223372036854775807, got -1"),
    (["hrv", "--seeds", "[]"], "--seeds must be a non-empty list, got []"),
    (["hrv", "--prompt_seed", "-1"], "--prompt_seed must be an integer >= 0 and <= 9223372036854775807, got -1"),
    (["hrv", "--word_seed", "-1"], "--word_seed must be an integer >= 0 and <= 9223372036854775807, got -1"),
    (["weaken", "--steps", "0"], "--steps must be an integer >= 1 and <= 1000, got 0"),
    (["weaken", "--images_per_point", "0"], "--images_per_point must be an integer >= 1, got 0"),
    (["weaken", "--points", "4"], "--points must be an integer >= 5, got 4"),
    (["weaken", "--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
    (["weaken", "--seed", "-1"], "--seed must be an integer >= 0 and <= 9223372036854775807, got -1"),
    (["weaken", "{guidance: .inf}"], "--guidance must be a finite number >= 0, got inf"),
    (["weaken", "{factor: .nan}"], "--factor must be a finite number, got nan"),
])
def test_analyze_counts__refused_in_one_line_before_any_work(monkeypatch, capsys, tmp_path, argv, says):
    import analysis.construct

    def load_model(cfg, name):
        raise AssertionError("the model loaded before the counts were checked")

    monkeypatch.setattr(analysis.construct, "load_model", load_model)
    if argv[1].startswith("{"):  # a YAML config file
        (tmp_path / "c.yaml").write_text(argv[1])
        argv = [argv[0], str(tmp_path / "c.yaml")]
    assert main(["analyze", *argv, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"diffatlas analyze {argv[0]}: error: {says}\n"
    assert not (tmp_path / "o").exists()


def test_sampling_defaults__steps_0_is_not_the_model_default(random_toy_pipe):
    from analysis.construct import sampling_defaults

    assert sampling_defaults(random_toy_pipe, 0, None)[0] == 0  # a check refuses it; it is never swapped for 25


@pytest.mark.parametrize("sub", [["hrv"], ["weaken", "--hrv", "nowhere"], ["features", "nowhere", "nowhere"]])
@pytest.mark.parametrize("place, says", [("file", "is a file, not a folder; give a new or empty folder"),
                                         ("file/sub", "cannot be made: 'FILE' is a file")])
def test_analyze_out__a_file_or_a_place_that_cannot_be_written_is_one_line_before_any_work(monkeypatch, capsys, tmp_path,
                                                                                            sub, place, says):
    import analysis.construct

    monkeypatch.setattr(analysis.construct, "load_model", lambda *a: pytest.fail("the model loaded before --out was checked"))
    (tmp_path / "file").write_text("")
    out = str(tmp_path / place)
    assert main(["analyze", *sub, "--out", out]) == 2
    says = says.replace("FILE", str(tmp_path / "file"))
    assert capsys.readouterr().err == f"diffatlas analyze {sub[0]}: error: --out {out!r} {says}\n"


def test_dispatcher__a_full_disk_is_one_line_naming_the_file_other_os_errors_keep_their_traceback(monkeypatch, capsys,
                                                                                                    tmp_path):
    import errno

    import analysis.construct

    def full_disk(cfg, name):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "hrv.safetensors"))

    monkeypatch.setattr(analysis.construct, "load_model", full_disk)
    assert main(["analyze", "hrv", "--wandb", "false", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"diffatlas analyze hrv: error: No space left on device: {tmp_path / 'hrv.safetensors'}\n"

    def broken_device(cfg, name):
        raise OSError(errno.EIO, "Input/output error")  # not the place's refusal: a traceback

    monkeypatch.setattr(analysis.construct, "load_model", broken_device)
    with pytest.raises(OSError):
        main(["analyze", "hrv", "--wandb", "false", "--out", str(tmp_path / "o")])


HUGE = "99999999999999999999"  # > 2**63 - 1: torch.Generator.manual_seed fails on it, mid-run
SEED_RANGE = "an integer >= 0 and <= 9223372036854775807"


@pytest.mark.parametrize("argv, says", [
    (["harvest", "configs/harvest/toy.yaml", "--seed", HUGE], f"--seed must be {SEED_RANGE}, got {HUGE}"),
    (["harvest", "configs/harvest/toy.yaml", "--seed", "-1"], f"--seed must be {SEED_RANGE}, got -1"),
    (["generate", "--prompts", '["a red circle"]', "--seeds", f"[0, {HUGE}]"], f"--seeds must be {SEED_RANGE}, got {HUGE}"),
    (["generate", "--prompts", '["a red circle"]', "--seeds", "[-1]"], f"--seeds must be {SEED_RANGE}, got -1"),
    (["analyze", "hrv", "--prompt_seed", HUGE], f"--prompt_seed must be {SEED_RANGE}, got {HUGE}"),
    (["analyze", "hrv", "--seeds", f"[{HUGE}]"], f"--seeds must be {SEED_RANGE}, got {HUGE}"),
    (["analyze", "weaken", "--seed", HUGE], f"--seed must be {SEED_RANGE}, got {HUGE}"),
])
def test_seeds__beyond_the_generators_range_or_negative_refused_in_one_line_before_loading(monkeypatch, capsys, tmp_path,
                                                                                           argv, says):
    import activations.generate
    import activations.harvest
    import activations.pipeline
    import analysis.construct

    def load(*args, **kwargs):
        raise AssertionError("the model loaded before the seeds were checked")

    for module in (activations.pipeline, activations.harvest):
        monkeypatch.setattr(module, "load_pipeline", load)
    monkeypatch.setattr(analysis.construct, "load_model", load)
    where = " ".join(argv[:2]) if argv[0] == "analyze" else argv[0]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"diffatlas {where}: error: {says}\n"
    assert not (tmp_path / "o").exists()


def test_seeds__a_steer_recipe_seed_beyond_the_range_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: toy\nprompts: [a red circle]\nseeds: [{HUGE}]\nsteps: 2\nguidance: 4.0\ninterventions: []\n")
    _one_line_error(capsys, ["steer", str(recipe), "--out", str(tmp_path / "o")],
                    f"seed 0 must be an integer in 0..9223372036854775807, got {HUGE}")


def test_seeds__one_bound_for_every_command():
    import steering.explorer.session as session
    import steering.recipe as recipe
    from common.config import MAX_SEED

    assert MAX_SEED == 2**63 - 1 and session.LIMITS["seed"] is MAX_SEED
    assert "MAX_SEED =" not in Path(recipe.__file__).read_text()  # imported from common.config, not redefined


@pytest.mark.parametrize("argv, says", [
    (["generate", "--prompts", '["a red circle"]', "--guidance", "nan"], "--guidance must be a number or null, got 'nan'"),
    (["generate", "--prompts", '["a red circle"]', "--steps", "many"], "--steps must be an integer or null, got 'many'"),
    (["analyze", "hrv", "--batch_size", "1.5"], "--batch_size must be an integer, got '1.5'"),
    (["analyze", "weaken", "--tokens", "bogus"], "--tokens must be one of semantic, all_but_start, got 'bogus'"),
])
def test_parse__a_value_of_the_wrong_type_is_one_short_line_naming_the_option(capsys, argv, says):
    assert main(argv) == 2
    where = " ".join(argv[:2]) if argv[0] == "analyze" else argv[0]
    assert capsys.readouterr().err == f"diffatlas {where}: error: {says}\n"


def test_output_piped_into_a_reader_that_stops__ends_quietly_without_a_traceback(monkeypatch, capsys):
    import activations.sites

    def reader_gone(argv):  # what print() raises once `| head` has exited
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(activations.sites, "main", reader_gone)
    assert main(["sites", "sd-1.4"]) == 141
    assert capsys.readouterr().err == ""
