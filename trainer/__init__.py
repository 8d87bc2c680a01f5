"""The V&L transformer trainer that reads feature stores and pair shards.

Modules (import them directly; this package imports nothing heavy):

* :mod:`vlp.trainer.config` - the typed config (TrainConfig, ModelConfig, StageConfig, SourceConfig,
  EvalConfig) with its defaults and checks, read from YAML;
* :mod:`vlp.trainer.runs` - run-folder policy (--resume, config.yaml) and :func:`~vlp.trainer.runs.train`;
* :mod:`vlp.trainer.data` - PairDataset over (PairStore, FeatureStore), collate, length buckets,
  the mixture plan of a stage's sources;
* :mod:`vlp.trainer.model` - single-stream encoder on transformers' BertModel;
* :mod:`vlp.trainer.lxmert` - LXMERT-S cross-modal encoder on LxmertModel;
* :mod:`vlp.trainer.tasks` - pretraining tasks (MLM, MOC, MOC_KL, MRFR, ITM, ITM_HS, IFRS, TITP, TITS);
* :mod:`vlp.trainer.pretrain` - the training loop (one process or one DDP rank) with exact resume;
* :mod:`vlp.trainer.distributed` - DDP on Ray Train workers;
* :mod:`vlp.trainer.evaluation` - held-out accuracies and zero-shot retrieval with the ITM head;
* :mod:`vlp.trainer.reporting` - history / TensorBoard logging, loss-curve PNGs, run summaries;
* :mod:`vlp.trainer.schedule` - multi-stage YAML schedules (examples in ``configs/``);
* :mod:`vlp.trainer.topics` - W ∩ L topic sets (:mod:`vlp.schemas.labels`);
* :mod:`vlp.trainer.toydata` - tiny stores for tests and smoke runs;
* ``configs/`` - example schedules; ``configs/demo.yaml`` with ``vocab/demo-vocab.txt`` trains
  on the synthetic world with no BERT checkpoint (:func:`demo_config`).
"""
