"""Floor 5: the run pipeline and what it drives (context and budgets, batches, trainer, distributed,
images and augmentation, features, weights, prediction, tracking, the run record).

Applications (``utils/``) call the engine; the engine never imports them.
"""
