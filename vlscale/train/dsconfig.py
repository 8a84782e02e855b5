"""Where the DeepSpeed JSON used to live; kept so that existing imports keep working.

The JSON is now one part of the run's resolved engine spec: :mod:`vlscale.train.launchers` merges
the launcher's settings (accelerate, a user's ``--deepspeed_config``) with the recipe, and
:mod:`vlscale.train.deepspeed_json` generates and completes the DeepSpeed config itself.
"""

from vlscale.train.launchers import resolve_batch, to_deepspeed_config

__all__ = ["resolve_batch", "to_deepspeed_config"]
