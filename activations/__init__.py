"""activations: load a pipeline, name its sites, read and edit them, harvest them to a store.

Public API (imported lazily, so that ``import activations.store`` never pays for diffusers):

* models:     ``load_pipeline`` (from .pipeline), ``build_denoiser``, ``build_unet``, ``model_config``
* sites:      ``Site``, ``list_sites``, ``head_table``, ``resolve_sites``
* the Intervention protocol: ``Intervention``, ``Call``, ``register_intervention``,
  ``save_interventions``, ``load_interventions``; built-in kinds ``HeadEdit``, ``SwapKV``,
  ``AddVector``, ``Scale``, ``Ablate``, ``Apply``, ``Observe``
* gates and masks: ``Window``, ``Steps``, ``Every``, ``Timesteps``, ``All``, ``Branch``,
  ``parse_when``; ``Patches``, ``Box``, ``Quadrant``, ``MaskImage``
* hooks:      ``intervene``, ``Tap``, ``attach``
* evaluation: ``evaluate`` (the denoising loss under interventions)
* text:       ``encode_prompts`` (prompts to the embeddings the denoiser reads), ``text_layout``,
  ``word_positions`` (where each tokenizer's tokens sit in that text)
* sampling:   ``generate``, ``sample``, ``generators`` (one CPU generator per image), ``schedule``
* families:   ``architecture_of``, ``denoiser_of`` (the one declaration of each denoiser kind)
* real images: ``Inversion`` (``activations.invert.invert``: an image to the noise its model draws it again from),
  ``read_images`` (real images through the denoiser, as the harvester reads them)
* tracing:    ``trace``, ``Trace``
* harvesting: ``Harvester``, ``HarvestConfig``
* store:      ``ActivationStore``, ``SiteReader``, ``SiteWriter``, ``write_synthetic_store``
"""

from __future__ import annotations

from common.lazy import lazy_exports

_EXPORTS = {
    "load_pipeline": "activations.pipeline",
    "build_denoiser": "activations.models",
    "build_unet": "activations.models",
    "model_config": "activations.models",
    "MODEL_CONFIGS": "activations.models",
    "Site": "activations.sites",
    "list_sites": "activations.sites",
    "head_table": "activations.sites",
    "resolve_sites": "activations.sites",
    "HeadProcessor": "activations.processor",
    "Intervention": "activations.intervention",
    "Call": "activations.intervention",
    "register_intervention": "activations.intervention",
    "save_interventions": "activations.intervention",
    "load_interventions": "activations.intervention",
    "HeadEdit": "activations.edits",
    "SwapKV": "activations.edits",
    "AddVector": "activations.edits",
    "Scale": "activations.edits",
    "Ablate": "activations.edits",
    "Apply": "activations.edits",
    "Observe": "activations.edits",
    "Window": "activations.timesteps",
    "Steps": "activations.timesteps",
    "Every": "activations.timesteps",
    "Timesteps": "activations.timesteps",
    "All": "activations.timesteps",
    "Branch": "activations.timesteps",
    "parse_when": "activations.timesteps",
    "Patches": "activations.masks",
    "Box": "activations.masks",
    "Quadrant": "activations.masks",
    "MaskImage": "activations.masks",
    "intervene": "activations.hooks",
    "evaluate": "activations.evaluate",
    "encode_prompts": "activations.text",
    "text_layout": "activations.text",
    "word_positions": "activations.text",
    "schedule": "activations.generate",
    "architecture_of": "activations.families",
    "denoiser_of": "activations.families",
    "Inversion": "activations.invert",
    "read_images": "activations.harvest",
    "ImageSource": "activations.config",
    "generate": "activations.generate",
    "sample": "activations.generate",
    "generators": "activations.generate",
    "Tap": "activations.hooks",
    "RunState": "activations.hooks",
    "attach": "activations.hooks",
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
