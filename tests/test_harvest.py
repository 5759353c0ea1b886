"""Harvesting into the store: rows, metadata, resuming, refusing, kill -9, two processes, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
from harvest_helpers import run_cli, write_yaml

from activations.config import HarvestConfig, PromptSource, load_config
from activations.harvest import Harvester, harvest
from activations.store import ActivationStore, ConfigMismatchError, CorruptShardError
from activations.trace import trace

BLOCK = "down_blocks.2.attentions.0"  # 4x4: five sampled positions fit
HEAD = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def rand_pipe(random_toy_pipe):
    """The toy architecture with random weights (conftest's random_toy_pipe)."""
    return random_toy_pipe


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory, rand_pipe):
    """The random-weight toy pipeline saved to disk, loadable by path in subprocesses."""
    folder = tmp_path_factory.mktemp("toy_model")
    rand_pipe.save_pretrained(folder)
    return str(folder)


def config(out, **kw) -> HarvestConfig:
    base = dict(
        model="toy",
        out=str(out),
        sites=[BLOCK, HEAD],
        prompts=PromptSource(kind="toyworld", num_prompts=4),
        num_inference_steps=4,
        timesteps="every:2",
        branch="both",
        positions=5,
        batch_size=2,
        images_per_shard=2,
        progress=False,
    )
    base.update(kw)
    return HarvestConfig(**base)


def all_rows(root, site):
    reader = ActivationStore(root, verify=True).site(site)
    acts, meta = reader.read(np.arange(reader.num_rows))
    key = np.lexsort([meta[f] for f in ("j", "i", "branch", "step", "image")][::-1][::-1])
    return acts[torch.from_numpy(key)], {k: v[key] for k, v in meta.items()}


def test_harvest_rows_and_metadata(tmp_path, rand_pipe):
    cfg = config(tmp_path / "h")
    summary = harvest(cfg, pipe=rand_pipe)
    assert summary["shards"] == 2 and summary["images"] == 4
    store = ActivationStore(cfg.out, verify=True)
    assert store.sites == sorted([BLOCK, HEAD])
    rand_pipe.scheduler.set_timesteps(4)
    schedule = [int(t) for t in rand_pipe.scheduler.timesteps]
    for name in (BLOCK, HEAD):
        site = store.site(name)
        assert site.num_rows == 4 * 2 * 2 * 5  # images x steps x branches x positions
        acts, meta = site.read(np.arange(site.num_rows))
        assert acts.dtype == torch.float16 and torch.isfinite(acts).all()
        assert sorted(set(meta["image"].tolist())) == [0, 1, 2, 3]
        assert sorted(set(meta["step"].tolist())) == [0, 2]
        assert set(meta["t"].tolist()) == {schedule[0], schedule[2]}
        np.testing.assert_allclose(meta["tau"], meta["t"] / 1000, rtol=1e-6)
        assert set(meta["branch"].tolist()) == {0, 1}
        assert (meta["seed"] == meta["image"]).all()
        h, w = site.grid
        assert (meta["i"] < h).all() and (meta["j"] < w).all()
        m = site.manifest
        assert m["timesteps"] == [schedule[0], schedule[2]] and m["branch"] == "both" and m["model"] == "toy"
        assert m["config"]["positions"] == 5 and len(m["config_hash"]) == 16
        assert [s["images"] for s in m["shards"]] == [[0, 2], [2, 4]]
    assert ActivationStore(cfg.out).site(HEAD).width == 64  # 4 heads x 16 dims, concatenated
    prompts = store.prompts()
    assert [p["image"] for p in prompts] == [0, 1, 2, 3] and all(p["text"] for p in prompts)
    images = tmp_path / "h" / "images"
    assert sorted(p.name for p in images.glob("*.png") if ".truth" not in p.name) == [f"{i}.png" for i in range(4)]
    truth = json.loads((images / "0.json").read_text())
    assert truth["text"] == prompts[0]["text"] and "objects" in truth["scene"]
    assert (images / "0.truth.png").exists()


def test_harvested_rows_equal_the_traced_values(tmp_path, rand_pipe):
    cfg = config(tmp_path / "h", branch="cond", positions=None, batch_size=1, images_per_shard=1,
                 prompts=PromptSource(kind="list", texts=["a big red plain circle at the center"]), save_images=False)
    harvest(cfg, pipe=rand_pipe)
    with trace(rand_pipe, sites=[BLOCK, HEAD], timesteps="every:2") as tr:
        rand_pipe(["a big red plain circle at the center"], num_inference_steps=4, guidance_scale=7.5,
                 generator=[torch.Generator().manual_seed(0)], output_type="latent")
    store = ActivationStore(cfg.out)
    for k, step in enumerate(tr.steps):
        got = store.site(BLOCK).feature_map(image=0, step=step)
        torch.testing.assert_close(got.float(), tr[BLOCK][0, k].float(), atol=2e-2, rtol=1e-2)
        heads = store.site(HEAD).feature_map(image=0, step=step)  # [i, j, heads*d]
        torch.testing.assert_close(heads.float(), tr.heads(HEAD)[0, k].flatten(-2).float(), atol=2e-2, rtol=1e-2)


def test_rerun_skips_finished_shards_and_writes_no_row_twice(tmp_path, rand_pipe):
    cfg = config(tmp_path / "h")
    harvest(cfg, pipe=rand_pipe)
    before = all_rows(cfg.out, BLOCK)
    again = harvest(cfg, pipe=rand_pipe)
    assert again["shards"] == 0 and again["skipped"] == 2
    after = all_rows(cfg.out, BLOCK)
    assert len(after[0]) == len(before[0])
    torch.testing.assert_close(after[0], before[0])


def test_a_different_config_is_refused_naming_the_fields(tmp_path, rand_pipe):
    harvest(config(tmp_path / "h"), pipe=rand_pipe)
    with pytest.raises(ConfigMismatchError) as err:
        harvest(config(tmp_path / "h", positions=7, num_inference_steps=5), pipe=rand_pipe)
    assert "positions: 5 -> 7" in str(err.value) and "num_inference_steps: 4 -> 5" in str(err.value)
    # run-time fields (devices, progress, out) are not part of the content: resuming is allowed
    harvest(config(tmp_path / "h", progress=True, verify=False), pipe=rand_pipe)


def test_store_of_another_model_is_refused(tmp_path, rand_pipe):
    from toyworld.model import build_pipeline

    harvest(config(tmp_path / "h"), pipe=rand_pipe)
    with pytest.raises(ConfigMismatchError, match="model_revision"):
        harvest(config(tmp_path / "h"), pipe=build_pipeline(seed=1))


def test_prompt_sources_file_dataset_and_list(tmp_path, rand_pipe):
    import datasets

    texts = ["a red circle", "a blue square", "a green triangle"]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n\n")
    datasets.Dataset.from_dict({"caption": texts}).save_to_disk(str(tmp_path / "ds"))
    sources = {
        "file": PromptSource(kind="file", path=str(tmp_path / "p.txt")),
        "dataset": PromptSource(kind="dataset", path=str(tmp_path / "ds"), column="caption", num_prompts=2),
        "list": PromptSource(kind="list", texts=texts),
    }
    for name, src in sources.items():
        cfg = config(tmp_path / name, prompts=src, sites=[BLOCK], num_inference_steps=2, timesteps="all", branch="cond", save_images=False)
        harvest(cfg, pipe=rand_pipe)
        got = [p["text"] for p in ActivationStore(cfg.out).prompts()]
        assert got == texts[: len(got)] and len(got) == (2 if name == "dataset" else 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sites": ["mid_block.attention.0"]}, "Closest matches: mid_block.attentions.0"),
        ({"timesteps": {"t": [5]}}, "not in the schedule; valid timesteps"),
        ({"timesteps": [5]}, "not one of the accepted forms"),
        ({"timesteps": "earliest"}, "'early', 'middle', 'late'"),
        ({"guidance_scale": 1.0, "branch": "uncond"}, "needs classifier-free guidance"),
        ({"scheduler": "DDIMSchedular"}, "valid schedulers"),
        ({"prompts": PromptSource(kind="dataset", path="/nonexistent/ds")}, ""),
        ({"prompts": PromptSource(kind="toyworld")}, "needs prompts.num_prompts"),
    ],
)
def test_bad_input_names_the_bad_value(tmp_path, rand_pipe, overrides, message):
    with pytest.raises((KeyError, ValueError, FileNotFoundError, Exception)) as err:
        Harvester(config(tmp_path / "h", **overrides), pipe=rand_pipe)
    assert message in str(err.value)


def test_corrupted_shard_is_named_when_resuming(tmp_path, rand_pipe):
    cfg = config(tmp_path / "h")
    harvest(cfg, pipe=rand_pipe)
    path = tmp_path / "h" / BLOCK / "shard-000001.acts.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"shard-000001 of site {BLOCK}"):
        harvest(cfg, pipe=rand_pipe)


def test_harvest_of_an_sdxl_family_pipeline(tmp_path):
    from activations.models import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")
    site = "mid_block.attentions.0.transformer_blocks.1.attn2"
    cfg = config(tmp_path / "xl", model="tiny-sdxl", sites=["down_blocks.2.attentions.0", site], positions=None,
                 num_inference_steps=3, timesteps="all", prompts=PromptSource(kind="list", texts=["a red cat", "a dog"]))
    harvest(cfg, pipe=pipe)
    store = ActivationStore(cfg.out, verify=True)
    assert store.site(site).num_rows == 2 * 3 * 2 * 4  # images x steps x branches x (2x2 positions)
    assert store.site(site).width == 32 and store.site("down_blocks.2.attentions.0").grid == (2, 2)
    assert store.site(site).feature_map(image=1, step=2, branch="uncond").shape == (2, 2, 32)


def test_config_file_round_trip_and_cli_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": "toy", "sites": [BLOCK], "timesteps": "early",
                                             "prompts": {"kind": "toyworld", "num_prompts": 3}})
    cfg = load_config(str(path))
    assert cfg.timesteps == "early" and cfg.prompts.num_prompts == 3 and cfg.branch == "cond"
    from activations.config import parse_args

    cfg = parse_args([str(path), "--timesteps", "{t: [999, 500]}", "--branch", "both"])
    assert cfg.timesteps == {"t": [999, 500]} and cfg.branch == "both"


# -- subprocess tests: the real command, killed and distributed ---------------------------------


def cli_config(tmp_path, toy_folder, out, **kw):
    data = {
        "model": toy_folder,
        "out": str(out),
        "sites": [BLOCK, HEAD],
        "prompts": {"kind": "toyworld", "num_prompts": 10},
        "num_inference_steps": 4,
        "timesteps": "every:2",
        "branch": "both",
        "positions": 6,
        "batch_size": 1,
        "images_per_shard": 1,
        "progress": False,
        **kw,
    }
    return write_yaml(tmp_path / f"{out.name}.yaml", data)


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, toy_folder):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = cli_config(tmp, toy_folder, tmp / "ref")
    res = run_cli(["harvest", str(cfg)])
    assert res.returncode == 0, res.stdout + res.stderr
    return tmp / "ref"


def assert_same_rows(a, b):
    for site in (BLOCK, HEAD):
        xa, ma = all_rows(a, site)
        xb, mb = all_rows(b, site)
        assert len(xa) == len(xb) == 10 * 2 * 2 * 6
        key = np.stack([mb[f] for f in ("image", "step", "branch", "i", "j")], 1)
        assert len(np.unique(key, axis=0)) == len(key)  # no row twice
        for f in ma:
            np.testing.assert_array_equal(ma[f], mb[f])
        assert torch.equal(xa, xb)


def test_kill_9_then_rerun_gives_exactly_the_uninterrupted_rows(tmp_path, toy_folder, reference_store):
    out = tmp_path / "killed"
    cfg = cli_config(tmp_path, toy_folder, out)
    # a shell without job control starts background commands with SIGINT ignored, and Python keeps it
    # so; give the child the default disposition, as an interactive terminal would
    proc = run_cli(["harvest", str(cfg)], background=True,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = out / HEAD / "manifest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if manifest.exists():
                with open(manifest) as f:
                    try:
                        if len(json.load(f)["shards"]) >= 2:
                            break
                    except json.JSONDecodeError:
                        pass
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = len(json.loads(manifest.read_text())["shards"])
    assert 2 <= finished < 10, f"the harvest was not interrupted mid-way ({finished} shards)"
    res = run_cli(["harvest", str(cfg)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already finished" in res.stdout
    assert not list(out.glob("*/*.tmp*"))
    assert_same_rows(reference_store, out)


def test_two_processes_store_exactly_the_rows_of_one(tmp_path, toy_folder, reference_store):
    out = tmp_path / "ddp"
    cfg = cli_config(tmp_path, toy_folder, out, devices=2, accelerator="cpu")
    res = run_cli(["harvest", str(cfg)], timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    ranks = {s["rank"] for s in ActivationStore(out).site(BLOCK).shards}
    assert ranks == {0, 1}  # each rank wrote its own shards
    assert_same_rows(reference_store, out)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, toy_folder):
    cfg = cli_config(tmp_path, toy_folder, tmp_path / "bad", sites=["mid_block.attention.0"])
    res = run_cli(["harvest", str(cfg)])
    assert res.returncode == 2
    assert "unknown site 'mid_block.attention.0'" in res.stderr and "Traceback" not in res.stderr


# -- issue 9: one config per store, grids of the run, numerics, range checks -------------------


def test_adding_sites_with_other_seed__refused(tmp_path, rand_pipe):
    harvest(config(tmp_path / "h", sites=[BLOCK]), pipe=rand_pipe)
    truth = (tmp_path / "h" / "images" / "0.json").read_bytes()
    with pytest.raises(ConfigMismatchError, match="seed: 0 -> 5"):
        harvest(config(tmp_path / "h", sites=[HEAD], seed=5), pipe=rand_pipe)
    assert not (tmp_path / "h" / HEAD).exists()
    assert (tmp_path / "h" / "images" / "0.json").read_bytes() == truth


def test_adding_a_site_with_the_same_config__keeps_prompts_and_images(tmp_path, rand_pipe):
    root = tmp_path / "h"
    harvest(config(root, sites=[BLOCK]), pipe=rand_pipe)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [root / "prompts.jsonl", *sorted((root / "images").iterdir())]}
    summary = harvest(config(root, sites=[HEAD]), pipe=rand_pipe)
    assert summary["shards"] == 2 and ActivationStore(root).site(HEAD).num_rows == 4 * 2 * 2 * 5
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == files  # written once, never again
    harvest(config(root, sites=[BLOCK, HEAD]), pipe=rand_pipe)  # any subset of the sites resumes
    assert json.loads((root / "store.json").read_text())["config"]["seed"] == 0


def test_changed_prompts_jsonl__refused(tmp_path, rand_pipe):
    root = tmp_path / "h"
    harvest(config(root, sites=[BLOCK]), pipe=rand_pipe)
    lines = (root / "prompts.jsonl").read_text().splitlines(keepends=True)
    (root / "prompts.jsonl").write_text("".join(lines[:-1]))
    with pytest.raises(ConfigMismatchError, match="prompts.jsonl differs"):
        harvest(config(root, sites=[HEAD]), pipe=rand_pipe)


@pytest.mark.parametrize("height, width", [(32, 32), (64, 96)])
def test_other_image_sizes__grid_from_the_run_and_rows_equal_trace(tmp_path, rand_pipe, height, width):
    text = "a big red plain circle at the center"
    cfg = config(tmp_path / "h", branch="cond", positions=None, batch_size=1, images_per_shard=1, num_inference_steps=2,
                 timesteps="all", prompts=PromptSource(kind="list", texts=[text]), save_images=False, height=height, width=width)
    harvest(cfg, pipe=rand_pipe)
    with trace(rand_pipe, sites=[BLOCK, HEAD], timesteps="all") as tr:
        rand_pipe([text], num_inference_steps=2, guidance_scale=7.5, height=height, width=width,
                  generator=[torch.Generator().manual_seed(0)], output_type="latent")
    store = ActivationStore(cfg.out)
    latent = (height // 4, width // 4)
    assert store.site(BLOCK).grid == (latent[0] // 4, latent[1] // 4)  # down_blocks.2: two halvings
    assert store.site(HEAD).grid == (latent[0] // 2, latent[1] // 2)
    for k, step in enumerate(tr.steps):
        got = store.site(BLOCK).feature_map(image=0, step=step)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.float(), tr[BLOCK][0, k].float(), atol=2e-2, rtol=1e-2)
        heads = store.site(HEAD).feature_map(image=0, step=step)
        torch.testing.assert_close(heads.float(), tr.heads(HEAD)[0, k].flatten(-2).float(), atol=2e-2, rtol=1e-2)


def test_impossible_image_size__refused_before_anything_is_written(tmp_path, rand_pipe):
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 32 .* got 10; valid sizes: 32, 64"):
        Harvester(config(tmp_path / "h", height=10), pipe=rand_pipe)
    assert not (tmp_path / "h").exists()


def test_resume_with_other_threads__refused_naming_threads(tmp_path, rand_pipe):
    harvest(config(tmp_path / "h", sites=[BLOCK], prompts=PromptSource(kind="toyworld", num_prompts=2)), pipe=rand_pipe)
    manifest = json.loads((tmp_path / "h" / BLOCK / "manifest.json").read_text())
    assert manifest["numerics"]["threads"] == 1 and manifest["numerics"]["device"] == "cpu"
    assert {"dtype", "torch", "diffusers"} <= set(manifest["numerics"])
    with pytest.raises(ConfigMismatchError, match=r"numerics.threads: 1 -> 2"):
        harvest(config(tmp_path / "h", sites=[BLOCK], prompts=PromptSource(kind="toyworld", num_prompts=2), threads=2), pipe=rand_pipe)


def test_words_outside_the_toy_vocabulary__refused_before_anything_is_written(tmp_path, rand_pipe):
    cfg = config(tmp_path / "h", prompts=PromptSource(kind="list", texts=["a red hexagon"]))
    with pytest.raises(ValueError, match="'hexagon'.*valid words"):
        Harvester(cfg, pipe=rand_pipe)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_inference_steps": 0}, "--num_inference_steps must be an integer >= 1 and <= 1000, got 0"),
        ({"num_inference_steps": -2}, "--num_inference_steps must be an integer >= 1 and <= 1000, got -2"),
        ({"num_inference_steps": 10**9}, "--num_inference_steps must be an integer >= 1 and <= 1000, got 1000000000"),
        ({"batch_size": 0}, "--batch_size must be an integer >= 1, got 0"),
        ({"images_per_shard": 0}, "--images_per_shard must be an integer >= 1, got 0"),
        ({"images_per_prompt": 0}, "--images_per_prompt must be an integer >= 1, got 0"),
        ({"positions": 0}, "--positions must be an integer >= 1, got 0"),
        ({"seed": -1}, "--seed must be an integer >= 0 and <= 9223372036854775807, got -1"),
        ({"guidance_scale": -1.0}, "--guidance_scale must be a finite number >= 0, got -1.0"),
        ({"guidance_scale": float("nan")}, "--guidance_scale must be a finite number >= 0, got nan"),
        ({"threads": 0}, "--threads must be an integer >= 1, got 0"),
        ({"prompts": PromptSource(kind="toyworld", num_prompts=-3)}, "--prompts.num_prompts must be an integer >= 1, got -3"),
        ({"prompts": PromptSource(kind="list", texts=[])}, "at least 1 prompt, got 0"),
        ({"prompts": PromptSource(kind="list", texts=["  ", ""])}, "at least 1 prompt, got 0"),
        ({"prompts": "empty-file"}, "at least 1 prompt, got 0 from the file source"),
    ],
)
def test_numbers_out_of_range__refused_naming_the_field(tmp_path, rand_pipe, overrides, message):
    if overrides.get("prompts") == "empty-file":
        (tmp_path / "p.txt").write_text("\n  \n")
        overrides = {"prompts": PromptSource(kind="file", path=str(tmp_path / "p.txt"))}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Harvester(config(tmp_path / "h", **overrides), pipe=rand_pipe)
    assert not (tmp_path / "h").exists()


def test_probs_of_a_block_site__says_it_is_a_block_site(rand_pipe):
    with trace(rand_pipe, sites=[BLOCK], timesteps="all") as tr:
        rand_pipe(["a red circle"], num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match=r"is a block site; use tr.block\(site\) or tr\[site\]"):
        tr.probs(BLOCK)


def test_cli_steps_0__one_line_naming_the_field(tmp_path, toy_folder):
    cfg = cli_config(tmp_path, toy_folder, tmp_path / "zero", num_inference_steps=0)
    res = run_cli(["harvest", str(cfg)])
    assert res.returncode == 2
    assert res.stderr.strip() == "diffatlas harvest: error: --num_inference_steps must be an integer >= 1 and <= 1000, got 0"
    assert not (tmp_path / "zero").exists()


def test_sigint__one_line_saying_what_was_kept_and_rc_130(tmp_path, toy_folder):
    out = tmp_path / "int"
    # far more prompts than are harvested before the signal: on a loaded machine the signal may come
    # seconds after the first shard, and the run must still be going then
    cfg = cli_config(tmp_path, toy_folder, out, prompts={"kind": "toyworld", "num_prompts": 400})
    # a shell without job control starts background commands with SIGINT ignored, and Python keeps it
    # so; give the child the default disposition, as an interactive terminal would
    proc = run_cli(["harvest", str(cfg)], background=True,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = out / HEAD / "manifest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                if len(json.loads(manifest.read_text())["shards"]) >= 1:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    # (loading notices of other libraries are issue 9 item 13's, not this test's)
    ours = [line for line in output.splitlines() if line.startswith("diffatlas harvest:")]
    assert len(ours) == 1 and output.rstrip().endswith(ours[0]) and "Traceback" not in output, output
    assert "kept 1 finished shards" in ours[0] or "finished shards" in ours[0]
    assert "rerun the same command to resume" in ours[0]
