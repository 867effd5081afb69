"""The typed settings of every part of captioner, torch-free and at the bottom of the imports.

Each module here imports nothing of captioner but :mod:`captioner.errors`, :mod:`captioner.typed`
and its neighbours in this package, so any module may import a config, and ``import
captioner.configs.training`` stays light (no torch):

| module | holds |
|---|---|
| :mod:`~captioner.configs.checks` | the validation helpers every config uses (one exception type, ``UserError``) |
| :mod:`~captioner.configs.preprocessing` | :class:`Preprocessing`: resize, crop, mean, std of an encoder's input |
| :mod:`~captioner.configs.model` | ``model.*``: :class:`EncoderConfig`, :class:`DecoderConfig`, :class:`ModelConfig` |
| :mod:`~captioner.configs.decode` | :class:`DecodeConfig`: how captions are decoded |
| :mod:`~captioner.configs.decode_options` | the decoding options' table: CLI flags and HTTP query parameters |
| :mod:`~captioner.configs.data` | ``data.*``: :class:`DataConfig`, the splits |
| :mod:`~captioner.configs.training` | ``trainer.*`` and the whole run: :class:`TrainConfig`, :func:`parse_train_config` |
| :mod:`~captioner.configs.evaluate` | ``captioner evaluate``'s :class:`EvaluateConfig` |
| :mod:`~captioner.configs.hydra` | where ``conf/`` is, the ConfigStore entries, :func:`compose` |
"""
