"""When restarts happen: every ``K`` optimizer steps and/or ``n`` times per epoch.

Stateless (a function of the step), so a resumed run restarts at the same steps.
"""

from __future__ import annotations


def restart_due(step: int, *, every: int | None, per_epoch: int | None, steps_per_epoch: int) -> bool:
    """Whether a restart precedes optimizer step ``step`` (0-based).

    Step 0 always restarts (the full-gradient initialisation, Algorithm 2 with ``k = 1``).
    ``every`` alone: steps ``0, K, 2K, ...``. ``per_epoch`` alone: ``n`` evenly spaced restarts
    in each epoch. Both: multiples of ``K``, at most ``n`` of them per epoch (Appendix F caps
    PESO-LoRA-R at two restarts per epoch).
    """
    if step == 0:
        return True
    spe = max(steps_per_epoch, 1)
    epoch_start = (step // spe) * spe
    if every is not None and per_epoch is None:
        return step % every == 0
    if per_epoch is not None and every is None:
        positions = {epoch_start + (j * spe) // per_epoch for j in range(per_epoch)}
        return step in positions
    if every is not None and per_epoch is not None:
        if step % every:
            return False
        first = -(-epoch_start // every) * every  # first multiple of K in this epoch
        return (step - first) // every < per_epoch
    return False


def schedule_errors(every: int | None, per_epoch: int | None) -> list[str]:
    """One message per bad schedule field (``method.restart_every``, ``method.restarts_per_epoch``)."""
    errors = []
    if every is not None and every < 1:
        errors.append(f"method.restart_every (K) must be >= 1 (got {every})")
    if per_epoch is not None and per_epoch < 1:
        errors.append(f"method.restarts_per_epoch must be >= 1 (got {per_epoch})")
    if every is None and per_epoch is None:
        errors.append("method.restart_every or method.restarts_per_epoch must be set")
    return errors
