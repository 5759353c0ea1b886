"""The toy world's pixel-oracle scorer for the ordered weakening, as the ``toy`` model plugin
offers it (``common.plugins.world_truth``; the code lives in ``toyworld.plugin_truth``): analysis
never imports toyworld. Used only when the toy scorer is chosen.
"""

from __future__ import annotations

from common.plugins import world_truth


def ToyOracleScorer():  # noqa: N802 - the scorer's name in the CLI, the tests and the benchmarks
    """Fraction of images in which the pixel oracle still reads the prompt's value of a concept
    (object attributes are read wherever the object is)."""
    return world_truth("toy").scorer()


def toy_prompts(n: int, seed: int = 0) -> list:
    """``n`` one-object toy scenes and a prompt for each: [(prompt, scene)]."""
    return ToyOracleScorer().prompts("", n, seed)


def reads_value(truth, image, concept: str) -> bool:
    """Does the oracle read ``truth``'s value of ``concept`` in ``image`` (wherever the object is)?"""
    return ToyOracleScorer().reads_value(truth, image, concept)
