"""The region-feature captioner and CC-generated captions (Singh et al.).

* :mod:`.model` - the transformer encoder-decoder over region features and its decoding
  (greedy, beam, nucleus);
* :mod:`.task` - the XE and SCST tasks, run by the trainer's one loop
  (:class:`~vlp.trainer.pretrain.Pretrainer`);
* :mod:`.cider` - a fast CIDEr-D (the SCST reward) equal to pycocoevalcap's;
* :mod:`.metrics` - BLEU / METEOR / ROUGE-L / CIDEr-D through pycocoevalcap;
* :mod:`.config`, :mod:`.train` - ``vlp-train captioner``;
* :mod:`.generate` - ``vlp-build generate-captions`` (Ray actors, resumable).
"""
