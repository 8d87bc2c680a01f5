"""The V&L transformer trainer that reads feature stores and pair shards.

Modules (import them directly; this package imports nothing heavy):

* :mod:`vlp.trainer.data` - PairDataset over (PairStore, FeatureStore), collate, length buckets;
* :mod:`vlp.trainer.model` - single-stream encoder on transformers' BertModel;
* :mod:`vlp.trainer.lxmert` - LXMERT-S cross-modal encoder on LxmertModel;
* :mod:`vlp.trainer.tasks` - pretraining tasks (MLM, MOC, MOC_KL, MRFR, ITM, ITM_HS, IFRS, TITP, TITS);
* :mod:`vlp.trainer.pretrain` - the single-process training loop with exact resume;
* :mod:`vlp.trainer.schedule` - multi-stage YAML schedules (examples in ``configs/``);
* :mod:`vlp.trainer.topics` - interim W ∩ L topic sets;
* :mod:`vlp.trainer.toydata` - tiny stores for tests and smoke runs.
"""
