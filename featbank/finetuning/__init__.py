"""Fine-tune a backbone end to end: three strategies, per-group learning rates, LP-FT.

Strategies (the seed tutorial's three transfer methods):

* ``frozen``: the backbone is frozen (BatchNorm in eval mode), only a new linear head trains —
  feature extraction, but with augmented images instead of cached embeddings;
* ``partial``: the parameter groups before ``trainable_from`` are frozen, the rest train;
* ``full``: every group trains, starting from the pretrained weights.

Parameter groups come from :func:`featbank.backbones.param_groups` (``featbank backbones
--groups NAME``), with ``head`` (the new classifier) last. Learning rates per group come from a
preset (``seed-resnet``: the tutorial's table; ``seed-lite``: the same table mapped onto
EfficientNet-Lite's stages by output stride; ``seed``: whichever fits), an explicit
``group=lr,...`` list, or ``layer_decay`` (``lr * decay**k`` for the group ``k`` places below the
head). LP-FT (Kumar et al. 2022) starts from a linear head fitted by ``featbank fit --head linear``
(``init_head``) with its standardisation folded into the weights, so at step 0 the network
predicts exactly what the probe predicted.

Every epoch ends with an atomic checkpoint (model, optimizer, scheduler, scaler, RNG states,
history, best weights); ``resume=True`` continues it and reaches the weights an uninterrupted run
reaches. Augmentation draws from a generator seeded by (seed, epoch, image), so it does not
depend on worker processes or on where a run was resumed.

The result is a model bundle of kind ``"finetuned"`` (``model.safetensors`` holds ``features.*``
and ``head.*``) that ``featbank evaluate`` / ``predict`` / ``export`` accept, and that
:func:`featbank.backbones.load_backbone` loads as a backbone again (``featbank extract DATA
--backbone models/<name>``).
"""

from __future__ import annotations

from ._loop import FinetuneReport, finetune
from ._model import (
    FinetuneModel,
    build_optimizer,
    load_finetuned_backbone,
    load_finetuned_model,
    parse_lr_groups,
    resolve_rates,
)
from ._settings import LR_PRESETS, OPTIMIZERS, STRATEGIES, FinetuneSettings

__all__ = [
    "STRATEGIES",
    "OPTIMIZERS",
    "LR_PRESETS",
    "FinetuneSettings",
    "FinetuneReport",
    "FinetuneModel",
    "finetune",
    "parse_lr_groups",
    "resolve_rates",
    "build_optimizer",
    "load_finetuned_backbone",
    "load_finetuned_model",
]

