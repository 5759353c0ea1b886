"""diffatlas: find, name and steer the concepts a text-to-image diffusion model computes.

The work is split into flat packages (see docs/architecture.md and README.md):
``activations`` (loading, hooks, harvesting, the store), ``sae`` (sparse autoencoders),
``analysis``, ``steering`` and ``toyworld`` (the synthetic world and its bundled model).
This package only holds the ``diffatlas`` console command.
"""

__version__ = "0.1.0"
