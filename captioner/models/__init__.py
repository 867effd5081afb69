"""The captioning model: encoders (pretrained CNNs), recurrent decoders, attention, and the module
that joins them. Built from :class:`captioner.configs.model.ModelConfig`; imports configs, never
training (the losses are :mod:`captioner.training.losses`).

| module | holds |
|---|---|
| :mod:`~captioner.models.captioning` | :class:`CaptionModel` (encoder + decoder, parameter groups, trainable encoder stages), :func:`build_model` |
| :mod:`~captioner.models.encoders` | :class:`Encoder`, :func:`create_encoder`: torchvision / timm backbones without their head, local weight files, grids |
| :mod:`~captioner.models.backbones` | torchvision's ResNet-18..152 rebuilt without importing torchvision (the caption path's cold start) |
| :mod:`~captioner.models.small_resnet` | :class:`SmallResNet`: a compact ResNet for small images with coordinate channels, trained from scratch (``model.encoder.source=builtin``; the demo's encoder) |
| :mod:`~captioner.models.decoders` | the recurrent decoders: :class:`Decoder` (what they share), :class:`PooledDecoder`, :class:`SoftAttentionDecoder`, :func:`build_decoder`, :func:`rename_legacy_keys` |
| :mod:`~captioner.models.attention` | :class:`SoftAttention`: additive attention over the image grid |
"""
