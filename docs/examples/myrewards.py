"""An example reward plugin (the one the README shows; tests/rewards/test_plugin_example.py runs it).

Save a file like this next to where you launch, then:

    cispo-train 'reward.rewards=[{name: exact_match}, {name: myrewards:digit_credit, weight: 0.5}]'

A reward is a function of one `rewards.RewardInput` (prompt, completion, reference, metadata) that returns
a float or a `rewards.RewardResult(score, reason)`, in [0, 1] unless it declares another range (a penalty:
`@rewards.reward_range(-1, 1)`, or `low:`/`high:` in its config entry); keyword arguments come from the
config's `kwargs:`. It may also be named by file: `name: path/to/myrewards.py:digit_credit`. Its metrics
are `reward/digit_credit/...`. (Do not call such a file rewards.py: that name is ours; a plugin in one must
be named by path, `./rewards.py:fn`.)
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
