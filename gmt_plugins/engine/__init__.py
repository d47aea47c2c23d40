"""The masking engine: one algorithm (rank keys to a cut, apply the cut) with several backends.

:mod:`~gmt_plugins.engine.dispatch` is the only module that chooses a backend; the backends are
leaves beneath it: :mod:`~gmt_plugins.engine.reference` (torch, any device, the twin of the others),
:mod:`~gmt_plugins.engine.cpu` (the compiled C kernel) and :mod:`~gmt_plugins.engine.cuda` (the
device path). See ``docs/engine.md``.
"""
