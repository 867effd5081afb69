"""captioner: a Show-and-Tell image captioner (pretrained CNN encoder + LSTM decoder)."""

__version__ = "0.1.0"
