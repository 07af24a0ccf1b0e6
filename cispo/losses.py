"""Public path of the policy losses: ``cispo.losses.cispo_loss`` and friends live in cispo.algo.losses."""

from cispo.algo.losses import (  # noqa: F401
    LOSSES,
    NORMALIZERS,
    PolicyLoss,
    cispo_loss,
    dapo_loss,
    get_policy_loss,
    grpo_loss,
    normalization_weights,
    register_policy_loss,
    registered_losses,
)
