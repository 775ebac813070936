"""The training engine between the libraries (``utils``, ``datasets``, ``models``) and the scripts.

- ``episode``: one stage-2 episode (gallery shortlists, deformed images, both losses) and the gallery bank;
- ``stage1``, ``stage2``: each stage's data, model and optimisers, ``train_one_epoch`` and ``evaluate``;
- ``diagnostics``: stage 2's per-episode diagnostics as a table;
- ``features``: embedding features cached by image while the embedding is fixed;
- ``fewshot``: few-shot evaluation of an embedding with a prototype classifier;
- ``lowshot``: the ImageNet-1K low-shot evaluation (``lowshot_imagenet.py``);
- ``precise_bn``: BatchNorm statistics re-estimated over clean images (``--preciseBN``);
- ``run``: a training run's folder, resumable state, interruption and metrics log;
- ``experiments``: runs of the scripts as processes, packed, reused, compared over seeds;
- ``options``: the flags and the typed configurations built from them;
- ``figures``: the deformed-images figure; ``timing``: the timing hook.
"""
