"""vlscale.train: the training loop, checkpoints and the ``vlscale train`` command.

``python -m vlscale.train --recipe tiny-cpu key=value ...`` (under ``deepspeed --num_gpus N
--module`` or ``torchrun``) → :func:`vlscale.train.cli.main` → :class:`~vlscale.train.trainer.Trainer`.
Submodules: ``trainer`` (the loop), ``checkpoint`` (atomic engine checkpoints + resume),
``launchers`` (what started the run + the user's launcher settings → one resolved engine spec;
``accelerate_env`` reads accelerate's plugins, ``deepspeed_json`` builds the DeepSpeed JSON),
``optim`` (AdamW + cosine), ``losses`` (the objective),
``evaluate`` (retrieval during training), ``metrics`` (JSONL / TensorBoard / tqdm), ``runtime``.
Importing this package imports none of them (the CLI stays light).
"""
