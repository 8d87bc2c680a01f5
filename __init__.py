"""vlp: bottom-up-attention features, pair shards and V&L pretraining.

Sub-packages: ``vlp.schemas`` (record formats and stores), ``vlp.detectors``
(the Visual-Genome Faster R-CNN), ``vlp.pipeline`` (extraction and imports),
``vlp.builders`` (pair shards), ``vlp.trainer`` (pretraining and finetuning).
"""

__version__ = "0.1.0"
