"""activations: load a pipeline, name its sites, read and edit them, harvest them to a store.

Public API (imported lazily, so that ``import activations.store`` never pays for diffusers):

* models:     ``load_pipeline`` (from .pipeline), ``build_unet``, ``model_config``
* sites:      ``Site``, ``list_sites``, ``head_table``, ``resolve_sites``
* processor:  ``HeadProcessor``, ``AttnCall``, ``HeadEdit``, ``SwapKV``, ``AddVector``
* hooks:      ``Tap``, ``attach``, ``edit_block``, ``capture_block``, ``observe_heads``, ``edit_heads``
* tracing:    ``trace``, ``Trace``
* harvesting: ``Harvester``, ``HarvestConfig``
* store:      ``ActivationStore``, ``SiteReader``, ``SiteWriter``, ``write_synthetic_store``
"""

from __future__ import annotations

from diffatlas.lazy import lazy_exports

_EXPORTS = {
    "load_pipeline": "activations.pipeline",
    "build_unet": "activations.models",
    "model_config": "activations.models",
    "MODEL_CONFIGS": "activations.models",
    "Site": "activations.sites",
    "list_sites": "activations.sites",
    "head_table": "activations.sites",
    "resolve_sites": "activations.sites",
    "HeadProcessor": "activations.processor",
    "AttnCall": "activations.processor",
    "HeadEdit": "activations.processor",
    "SwapKV": "activations.processor",
    "AddVector": "activations.processor",
    "Tap": "activations.hooks",
    "RunState": "activations.hooks",
    "attach": "activations.hooks",
    "edit_block": "activations.hooks",
    "capture_block": "activations.hooks",
    "observe_heads": "activations.hooks",
    "edit_heads": "activations.hooks",
    "trace": "activations.trace",
    "Trace": "activations.trace",
    "Harvester": "activations.harvest",
    "HarvestConfig": "activations.config",
    "ActivationStore": "activations.store",
    "SiteReader": "activations.store",
    "SiteWriter": "activations.store",
    "write_synthetic_store": "activations.store",
    "WINDOWS": "activations.timesteps",
    "select_steps": "activations.timesteps",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports('activations', _EXPORTS, globals())
