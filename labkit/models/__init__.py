"""Networks, their losses, training steps, trainers and load functions (no study bookkeeping).

- :mod:`labkit.models.fronts`         the missing-data fronts (the first conv+ReLU of a network)
- :mod:`labkit.models.classifier`     the paper's classifiers, ``train_classifier``, ``evaluate_accuracy``
- :mod:`labkit.models.dmfa`           deep MFA inpainters, the protocol's masks, inference, ``load_dmfa``
- :mod:`labkit.models.dmfa_training`  the DMFA loss and its resumable trainer
- :mod:`labkit.models.acflow`         the ACFlow imputer (a conditional normalizing flow)
- :mod:`labkit.models.acflow_training`  its trainer, loader and NLL evaluation
- :mod:`labkit.models.wae`            WAE-GAN networks and training recipes
- :mod:`labkit.models.wae_training`   WAE-GAN losses, optimizers and training steps

Models never import :mod:`labkit.studies` at run time.
"""
