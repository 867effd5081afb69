"""Evaluation: BLEU and CIDEr-D, ``captioner evaluate``, its HTML report and attention maps."""
