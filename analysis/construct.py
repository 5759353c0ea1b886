"""``diffatlas analyze hrv``: generate images and count HRV votes in the same pass, resumably.

Jobs are (prompt, seed) pairs in a fixed order. After every batch the votes and the number of
finished jobs are written together, atomically (one safetensors file replaced, common.files.write_atomic), so
an interrupted run resumes after the last finished batch and never counts a job twice. The words
sampled for a job depend only on (word_seed, job id) (see VoteCounter), so the resumed result
equals the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from activations.generate import sample, schedule
from analysis.concepts import load_concepts
from analysis.config import HRVConfig
from analysis.hrv import HRV, VoteCounter
from analysis.mechanism import head_sites, observe_queries
from analysis.words import encode_words, named_words
from common.config import save_config
from common.errors import UsageError

PROGRESS = "progress.safetensors"
# fields that do not change the votes: a rerun with other values resumes
RUNTIME_FIELDS = ("out", "device", "progress", "wandb", "batch_size")


def content(cfg: HRVConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}


def load_model(cfg, name: str):
    from activations.pipeline import load_pipeline, set_scheduler

    pipe = load_pipeline(name, device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, getattr(cfg, "scheduler", None))
    return pipe


def sampling_defaults(pipe, steps, guidance) -> tuple[int, float]:
    from activations.pipeline import model_defaults

    d = model_defaults(pipe)
    return int(steps if steps is not None else d["num_inference_steps"]), float(guidance if guidance is not None else d["guidance_scale"])


def prompt_texts(cfg: HRVConfig) -> list[str]:
    from activations.prompts import PromptSet

    ps = PromptSet(cfg.prompts, seed=cfg.prompt_seed)
    return [ps.text(i) for i in range(len(ps))]


def progress_key(cfg: HRVConfig, concepts) -> dict:
    """What a progress file is keyed on: the config fields that change the votes and the concept
    words themselves (the concept file a config names may be edited between a kill and the resume;
    a list of pairs, as JSON sorts a dict's keys and the concepts' order is the votes' rows)."""
    return {**content(cfg), "concept_words": [[name, list(words)] for name, words in zip(concepts.names, concepts.words)]}


def _save_progress(path: Path, counter: VoteCounter, done: int, key: dict) -> None:
    from safetensors.torch import save_file

    from common.files import write_atomic

    meta = {"done": str(done), "step_t": json.dumps(counter.step_t), "config": json.dumps(key, sort_keys=True)}
    # votes and the finished count change together or not at all
    write_atomic(path, lambda tmp: save_file({"votes": counter.votes.contiguous()}, str(tmp), metadata=meta))


def _read_progress(path: Path, key: dict) -> tuple[torch.Tensor, list, int] | None:
    """(votes, step_t, finished jobs) of an interrupted run in ``path``, None when there is none;
    a run of another config or concept list is refused (a UsageError naming the fields)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            votes = f.get_tensor("votes")
        saved = json.loads(meta["config"])
    except (SafetensorError, KeyError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not an HRV progress file ({type(err).__name__}: {err}); delete it to start over") from None
    wanted = json.loads(json.dumps(key, sort_keys=True))
    if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise UsageError(f"{path.parent} holds an HRV run with another config (fields differ: {', '.join(diff)}); "
                         f"use another out folder or delete {path}")
    return votes, json.loads(meta["step_t"]), int(meta["done"])


def build_hrv(cfg: HRVConfig, pipe=None, max_batches: int | None = None) -> HRV | None:
    """Run (or resume) HRV construction; returns the HRV when all jobs are done, else None
    (``max_batches`` stops early: a way to split a long run, and how the tests interrupt one)."""
    from activations.sites import head_table

    cfg.check()  # the command checked it already; a config built in code is checked here
    concepts = load_concepts(cfg.concepts)
    texts = prompt_texts(cfg)
    out = Path(cfg.out)
    progress_path = out / PROGRESS
    key = progress_key(cfg, concepts)
    saved = _read_progress(progress_path, key)  # a run of another config is refused before anything is written
    if cfg.prompts.kind != "toyworld":
        from activations.prompts import check_prompts

        check_prompts(cfg.model, texts)  # a model with a fixed vocabulary (the toy one) refuses other words
    pipe = pipe if pipe is not None else load_model(cfg, cfg.model)
    steps, guidance = sampling_defaults(pipe, cfg.steps, cfg.guidance)
    bank = encode_words(pipe, concepts, contexts=texts if cfg.words == "in_context" else None, sink=cfg.sink,
                        steps=steps, guidance=guidance)  # every word once, before generating anything
    sites = head_sites(pipe)
    calls = len(schedule(pipe, steps))  # denoiser calls per generation (some schedulers add some)
    jobs = [(p, s) for p in range(len(texts)) for s in cfg.seeds]
    named = named_words(pipe, concepts, texts)[[p for p, _ in jobs]] if cfg.choose == "named" else None
    counter = VoteCounter(bank, sites, seed=cfg.word_seed, steps_hint=calls, named_jC=named)
    done = 0
    if saved is not None:
        counter.votes, counter.step_t, done = saved

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "hrv_config.yaml")
    bar = _bar(len(jobs), done, cfg.progress)
    batches = 0
    t0 = time.perf_counter()
    with observe_queries(pipe, counter.on_call):
        for start in range(done, len(jobs), cfg.batch_size):
            if max_batches is not None and batches >= max_batches:
                break
            chunk = list(range(start, min(start + cfg.batch_size, len(jobs))))
            counter.begin_batch(chunk, calls)
            with torch.no_grad():
                sample(pipe, [texts[jobs[j][0]] for j in chunk], [jobs[j][1] for j in chunk], steps=steps,
                       guidance=guidance, output_type="latent")
            counter.end_batch()
            done = chunk[-1] + 1
            _save_progress(progress_path, counter, done, key)
            bar.update(len(chunk))
            batches += 1
    bar.close()
    if done < len(jobs):
        return None
    hrv = HRV(
        concepts=concepts,
        votes=counter.votes,
        head_table=head_table(pipe),
        step_t=counter.step_t,
        num_train_timesteps=int(pipe.scheduler.config.get("num_train_timesteps", 1000)),
        meta={
            "model": cfg.model,
            "prompts": texts,
            "seeds": list(cfg.seeds),
            "word_seed": cfg.word_seed,
            "words": cfg.words,
            "sink": cfg.sink,
            "choose": cfg.choose,
            "steps": steps,
            "guidance": guidance,
            "scheduler": type(pipe.scheduler).__name__,
            "images": len(jobs),
            "seconds_this_run": round(time.perf_counter() - t0, 2),
        },
    )
    hrv.save(out)
    return hrv


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="hrv", disable=not enabled, dynamic_ncols=True)
