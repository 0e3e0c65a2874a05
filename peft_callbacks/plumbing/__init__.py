"""Lightning plumbing: what the public callbacks (:mod:`peft_callbacks.callbacks`) need from the Trainer.

Nothing here is a callback a user adds. These modules schedule surgery on Lightning's hooks
(:mod:`~peft_callbacks.plumbing.hooks`), read the strategy (:mod:`~peft_callbacks.plumbing.strategies`), keep
checkpoints in the plain layout and restore them (:mod:`~peft_callbacks.plumbing.checkpoint_hooks`,
:mod:`~peft_callbacks.plumbing.slim_loading`, :mod:`~peft_callbacks.plumbing.checkpoint_io`), find the base task of
the forgetting callbacks (:mod:`~peft_callbacks.plumbing.base_task`) and check distributed runs
(:mod:`~peft_callbacks.plumbing.rank_checks`).
"""
