"""An example reward plugin (the one the README shows; tests/rewards/test_plugin_example.py runs it).

Save a file like this next to where you launch, then:

    cispo-train 'reward.rewards=[{name: exact_match}, {name: myrewards:digit_credit, weight: 0.5}]'

A reward is a function of one `rewards.RewardInput` (prompt, completion, reference, metadata) that returns
a float in [0, 1] or a `rewards.RewardResult(score, reason)`; keyword arguments come from the config's
`kwargs:`. It may also be named by file: `name: path/to/myrewards.py:digit_credit`.
"""

from rewards import RewardInput, RewardResult


def digit_credit(sample: RewardInput, *, min_length: int = 1) -> RewardResult:
    """Partial credit: the share of the reference's digits that the answer gets right, place by place."""
    answer = sample.completion.strip()
    reference = str(sample.reference).strip()
    if len(answer) < min_length or not reference:
        return RewardResult(0.0, "empty answer")
    right = sum(a == b for a, b in zip(answer.rjust(len(reference)), reference))
    return RewardResult(right / len(reference), f"{right}/{len(reference)} digits")
