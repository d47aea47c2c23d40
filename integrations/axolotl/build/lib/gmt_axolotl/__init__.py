"""Gradient-Mask Tuning for Axolotl: ``plugins: [gmt_axolotl.GMTPlugin]`` plus ``gmt_*`` keys in the YAML config."""

from gmt_axolotl.args import GMTArgs
from gmt_axolotl.plugin import GMTPlugin

__all__ = ["GMTArgs", "GMTPlugin"]
