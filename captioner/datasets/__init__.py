"""Data: caption annotations (COCO and Karpathy formats), images and their transforms, the torch
datasets, the embedded demo dataset, and downloading / preparing real datasets.

| module | holds |
|---|---|
| :mod:`~captioner.datasets.annotations` | :class:`CaptionRecord` and the readers of every annotation format |
| :mod:`~captioner.datasets.images` | opening images, the evaluation transform, the training transform factory |
| :mod:`~captioner.datasets.captions` | the split a data config names, the caption datasets, collate, the resumable sampler |
| :mod:`~captioner.datasets.synthetic` | the embedded demo dataset (coloured shapes, COCO format) |
| :mod:`~captioner.datasets.download` | resumable, checked downloads |
| :mod:`~captioner.datasets.sources` | reading the Flickr token files, image lists and Karpathy splits that ``captioner prepare`` converts |
| :mod:`~captioner.datasets.prepare` | ``captioner prepare``'s converters: Flickr8k/Flickr30k/Karpathy -> COCO captions files |
| :mod:`~captioner.datasets.coco_download` | ``captioner prepare coco``: MS-COCO downloaded and unpacked |
"""
