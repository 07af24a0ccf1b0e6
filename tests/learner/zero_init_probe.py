"""Run as a script: builds the tiny MiniMax inside deepspeed.zero.Init (one CPU rank) and prints JSON
describing what came out, for tests/learner/test_deepspeed_learner.py."""

from __future__ import annotations

import json
import os

os.environ.update(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29731")

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
import torch  # noqa: E402
from transformers import MiniMaxForCausalLM  # noqa: E402, F401  (imported before zero.Init patches tensors)

from tests.learner.helpers import tiny_minimax  # noqa: E402


def main() -> None:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        with deepspeed.zero.Init(
            config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}
        ):
            model, tok = tiny_minimax()
    except Exception as err:  # the construction itself may break on partitioned (empty) parameters
        print(json.dumps({"built": False, "error": f"{type(err).__name__}: {err}"}))
        return
    ids = torch.tensor([tok("12+34=46")["input_ids"]])
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        router = model.model.layers[0].mlp.gate.weight
        experts = model.model.layers[0].mlp.experts.gate_up_proj
        result = {
            "built": True,
            "loss": float(model(input_ids=ids, labels=ids).loss),
            "router_std": float(router.float().std()),
            "experts_std": float(experts.float().std()),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
