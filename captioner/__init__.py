"""captioner: a Show-and-Tell image captioner (pretrained CNN encoder + LSTM, GRU or RNN decoder,
optionally attending over the image grid)."""

__version__ = "0.1.0"
