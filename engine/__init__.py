"""The training engine between the libraries (``utils``, ``datasets``, ``models``) and the scripts.

- ``episode``: one stage-2 episode (gallery shortlists, deformed images, both losses) and the gallery bank;
- ``stage1``, ``stage2``: each stage's data, model and optimisers, ``train_one_epoch`` and ``evaluate``;
- ``fewshot``: few-shot evaluation of an embedding with a prototype classifier;
- ``run``: a training run's folder, resumable state, interruption and metrics log;
- ``options``: both stages' flags; ``figures``: the deformed-images figure; ``timing``: the timing hook.
"""
