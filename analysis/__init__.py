"""analysis: reading what the U-Net's parts do: head relevance vectors and ordered weakening
(Park et al., ICLR 2025, Sections 3-4), and what an SAE's features mean (statistics, heads,
concepts, toy ground truth).

Public API (imported lazily, so that ``import analysis`` stays cheap):

* ``ConceptList``, ``load_concepts(path_or_name)``: concept lists (configs/concepts/)
* ``HRV``: ``.load(dir, pipe=None)``, ``.save(dir)``, ``.hrv``, ``.votes``, ``.top_heads(concept, n)``,
  ``.window(name)``, ``.check_model(pipe)``
* ``HRVConfig``, ``build_hrv(cfg, pipe=None)``: HRVs counted during generation, resumable
* ``WeakenConfig``, ``run_weakening(hrv, pipe, scorer, ...)``, ``head_orders``, ``head_counts``
* ``ToyOracleScorer`` (toy world), ``ClipScorer`` (real models)
* ``FeatureStats``, ``compute_feature_stats(sae, site_reader)``: per-feature statistics of an SAE
  (density, timestep and spatial profiles, top tokens, co-firing features), streaming
* ``feature_head_attribution(sae, pipe, store, stats, method="direct"|"total")``: [features, heads] in the global head order;
  ``concept_scores(hrv, attribution)``: features x HRV concepts
* ``FeaturesConfig``, ``build_report(cfg, pipe=None)``: the feature browser's data (W&B + HTML);
  ``FeatureLabels.load(out)``: each feature's density, top HRV concept and toy label read back
* ``main``: ``diffatlas analyze {hrv, weaken, features}``

The layering rule: analysis imports activations and sae, never steering or diffatlas.
"""

from __future__ import annotations

from common.lazy import lazy_exports

_EXPORTS = {
    "ConceptList": "analysis.concepts",
    "load_concepts": "analysis.concepts",
    "HRV": "analysis.hrv",
    "HRVConfig": "analysis.config",
    "WeakenConfig": "analysis.config",
    "build_hrv": "analysis.construct",
    "run_weakening": "analysis.weakening",
    "head_orders": "analysis.weakening",
    "head_counts": "analysis.weakening",
    "ToyOracleScorer": "analysis.toy",
    "ClipScorer": "analysis.clip_score",
    "main": "analysis.cli",
    "FeatureStats": "analysis.features",
    "compute_feature_stats": "analysis.features",
    "feature_head_attribution": "analysis.feature_heads",
    "concept_scores": "analysis.feature_concepts",
    "FeaturesConfig": "analysis.feature_report",
    "build_report": "analysis.feature_report",
    "FeatureLabels": "analysis.feature_report",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("analysis", _EXPORTS, globals())
