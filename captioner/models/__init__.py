"""The captioning model: encoders (pretrained CNNs), recurrent decoders, attention, and the module
that joins them. Built from :class:`captioner.configs.model.ModelConfig`."""
