"""``GMTPlugin``: Axolotl's plugin interface around :class:`gmt_plugins.GMTCallback`."""

from __future__ import annotations

import logging
from typing import Any

from axolotl.integrations.base import BasePlugin

from gmt_axolotl.args import SWITCH, gmt_config_kwargs

LOG = logging.getLogger(__name__)


class GMTPlugin(BasePlugin):
    """Gradient-Mask Tuning (https://arxiv.org/abs/2406.15330) in Axolotl.

    After gradient accumulation (and clipping), the gradient entries of smallest magnitude are zeroed
    before the optimizer steps; see gmt-plugins' ``GMTCallback``. List the plugin and set any ``gmt_*``
    key (:class:`~gmt_axolotl.args.GMTArgs`)::

        plugins:
          - gmt_axolotl.GMTPlugin
        gmt_mask_ratio: 0.2
        gmt_scope: tensor

    The callback is added once the trainer exists (``add_callbacks_post_trainer``, as Axolotl's
    Grokfast plugin does), then moved before the ``report_to`` callbacks (``post_trainer_create``)
    so that ``gmt/*`` statistics reach TensorBoard or W&B; ``gmt_enabled: false`` leaves it out.
    """

    def get_input_args(self) -> str:
        return "gmt_axolotl.args.GMTArgs"

    def build_callback(self, cfg: Any) -> Any | None:
        """The ``GMTCallback`` configured from ``cfg``'s ``gmt_*`` keys, or ``None`` when ``gmt_enabled`` is false."""
        if cfg.get(SWITCH) is False:
            LOG.info("gmt_enabled is false: no GMTCallback added")
            return None
        from gmt_plugins import GMTCallback, GMTConfig

        config = GMTConfig(**gmt_config_kwargs(cfg))
        LOG.info("Adding GMTCallback to the trainer: %s", config)
        return GMTCallback(config)

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[Any]:
        callback = self.build_callback(cfg)
        return [] if callback is None else [callback]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Axolotl calls this after the trainer builder added the post-trainer callbacks."""
        from gmt_plugins import GMTCallback
        from gmt_plugins.integrations.transformers import place_before_reporters

        if any(isinstance(cb, GMTCallback) for cb in trainer.callback_handler.callbacks):
            place_before_reporters(trainer)
