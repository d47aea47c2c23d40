"""``GMTArgs``: the ``gmt_*`` keys this plugin adds to Axolotl's config schema.

One key per :class:`~gmt_plugins.config.GMTConfig` field, prefixed with ``gmt_`` (Axolotl's convention:
``grokfast_alpha``, ``spectrum_top_fraction``), plus the ``gmt_enabled`` switch. The keys are generated
from ``GMTConfig``'s dataclass fields, so the two never drift apart; each value is checked by
``GMTConfig`` itself, and a ``ValueError`` there becomes a pydantic validation error on the ``gmt_*``
key, which Axolotl reports with the key named. The check runs before pydantic's type check, so what
``GMTConfig`` accepts (a single pattern for ``gmt_include``, a JSON string for ``gmt_strategy_options``)
is accepted here and stored normalised. ``None`` (or a missing key) means ``GMTConfig``'s default.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from pydantic import BaseModel, Field, ValidationInfo, create_model, field_validator

from gmt_plugins.config import GMTConfig

PREFIX = "gmt_"
SWITCH = "gmt_enabled"


def gmt_field_names() -> list[str]:
    """``GMTConfig``'s field names, in declaration order."""
    return [f.name for f in dataclasses.fields(GMTConfig)]


class _GMTArgsBase(BaseModel):
    """Checks shared by every ``gmt_*`` key; the keys themselves are added by :func:`_build`."""


    gmt_enabled: Optional[bool] = Field(
        default=None,
        description="Add the GMTCallback to the trainer (default true once the plugin is listed under `plugins:`); "
        "false keeps the plugin loaded and the gmt_* keys checked, without masking.",
    )

    @field_validator(*[PREFIX + name for name in gmt_field_names()], mode="before", check_fields=False)
    @classmethod
    def _checked_by_gmt_config(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        name = info.field_name[len(PREFIX):]
        try:
            checked = GMTConfig(**{name: value})
        except ValueError as err:
            message = str(err)
            if message.startswith(name):  # "mask_ratio must be ..." -> "gmt_mask_ratio must be ..."
                message = PREFIX + message
            raise ValueError(message) from None
        if name == "strategy":
            from gmt_plugins.plugins import strategy_registry

            names = strategy_registry().names()
            if checked.strategy not in names:
                raise ValueError(f"gmt_strategy: unknown strategy {checked.strategy!r}; registered strategies: {', '.join(names)}")
        return getattr(checked, name)  # normalised: a JSON string of strategy_options becomes a dict


def _build() -> type[BaseModel]:
    hints = typing.get_type_hints(GMTConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(GMTConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f.metadata.get("help", "")
        fields[PREFIX + f.name] = (
            Optional[hints[f.name]],
            Field(default=None, description=f"{help_text} GMTConfig.{f.name}; default {default!r}."),
        )
    return create_model("GMTArgs", __base__=_GMTArgsBase, __module__=__name__, **fields)


GMTArgs = _build()
GMTArgs.__doc__ = """Axolotl config keys of Gradient-Mask Tuning: ``gmt_enabled`` and ``gmt_<field>`` for every GMTConfig field.

Example (Axolotl YAML)::

    plugins:
      - gmt_axolotl.GMTPlugin
    gmt_mask_ratio: 0.2
    gmt_scope: tensor
    gmt_strategy: gmt
"""


def gmt_config_kwargs(cfg: Any) -> dict[str, Any]:
    """The ``GMTConfig`` keyword arguments set in an Axolotl config (a dict or ``DictDefault``); unset keys are left out."""
    values = {name: cfg.get(PREFIX + name) for name in gmt_field_names()}
    return {name: value for name, value in values.items() if value is not None}
