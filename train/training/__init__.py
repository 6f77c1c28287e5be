"""The fine-tuning library under train/finetune.py (and the base of the other roles): the fine-tune config family
and the shared config decoder (:mod:`.config`), data (:mod:`.data`, :mod:`.synthetic`), the training loop
(:mod:`.engine`, :mod:`.optim`, :mod:`.phase2`), run folders and checkpoints (:mod:`.rundir`, :mod:`.checkpoints`),
evaluation (:mod:`.evaluation`, :mod:`.metrics`), errors and injected faults (:mod:`.errors`, :mod:`.faults`), and
what train/predict.py writes (:mod:`.predicting`)."""
