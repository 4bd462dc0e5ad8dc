"""The training job, one room per job: ``setup`` (models, LoRA, optimizer), ``step`` (one
forward/backward and the loss), ``nan_policy``, ``saver`` (checkpoints and states), ``progress``
(where the run stands), ``loop`` (the step loop), assembled by ``job``. Nothing here imports torch
at module level; ``engine.trainer`` runs the lifecycle around it."""
