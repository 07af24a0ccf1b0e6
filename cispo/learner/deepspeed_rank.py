"""One DeepSpeed rank of the "deepspeed" learner: builds the engine, then serves the driver's requests.

Started either by the DeepSpeedLearner facade (launcher="spawn", one process per local rank) or by an
external launcher (torchrun, the deepspeed launcher, srun) as

    CISPO_LEARNER_AUTHKEY=<hex> python -m cispo.learner.deepspeed_rank --driver HOST:PORT

with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by that launcher. Every rank dials the
driver, says its rank, receives the model and configs, and then runs each request the driver sends to
all ranks at once (the collectives inside ZeRO need every rank in every forward/backward/step/gather).
Messages are pickled bytes over a multiprocessing.connection: a blocking send gives back-pressure when
weights stream out faster than the driver consumes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import traceback
from multiprocessing.connection import Client, Connection
from typing import Any

import torch
from torch import Tensor, nn

from cispo.algo.losses import get_policy_loss
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.types import TrainBatch
from cispo.learner.common import (
    StepParts,
    build_optimizer,
    lr_lambda,
    micro_batch_loss,
    moe_context,
    policy_logprobs,
    set_base_lr,
)


def send(conn: Connection, obj: Any) -> None:
    # Plain pickle (not the ForkingPickler's shared-memory tensors): no file descriptors to leak, and the
    # same bytes work across hosts.
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            deep_merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def build_ds_config(
    cfg: LearnerConfig, world: int, bf16: bool, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """DeepSpeed config for one optimizer step per train_step with caller-owned accumulation."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        # Batch-size fields only feed DeepSpeed's throughput counters: micro-batches vary in size here.
        "train_batch_size": world,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # Every engine.step() is the accumulation boundary, whatever number of backward calls preceded it.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # The client optimizer is torch's AdamW: DeepSpeed's own (Fused/CPU) Adam JIT-compiles a C++ op.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }
    return deep_merge(config, overrides or {})


class LogprobModule(nn.Module):
    """The engine's module: trunk + FP32 chunked head in one forward, so that under ZeRO-3 the head
    weight (read directly, not through lm_head's forward) is gathered as this module's external
    parameter for the forward and again for the backward."""

    def __init__(self, policy: nn.Module, cfg: LearnerConfig, temperature: float, packing: bool) -> None:
        super().__init__()
        self.policy, self.cfg, self.temperature, self.packing = policy, cfg, temperature, packing

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        rows = input_ids.shape[0]
        part = TrainBatch(
            input_ids,
            attention_mask,
            response_mask,
            torch.zeros_like(response_mask),
            torch.zeros(rows),
            torch.zeros(rows, dtype=torch.long),
        )
        return policy_logprobs(self.policy, part, self.cfg, self.temperature, with_entropy, self.packing)


class RankServer:
    def __init__(self, conn: Connection, rank: int, world: int, init: dict[str, Any]) -> None:
        import deepspeed

        self.conn, self.rank, self.world = conn, rank, world
        self.cfg: LearnerConfig = init["cfg"]
        self.algorithm: AlgorithmConfig = init["algorithm"]
        model = init["model"]
        policy = model if isinstance(model, nn.Module) else model()
        self.bf16 = any(p.dtype == torch.bfloat16 for p in policy.parameters())
        self.module = LogprobModule(policy, self.cfg, init["temperature"], init["packing"])
        self.loss_fn = get_policy_loss(self.algorithm.loss)
        optimizer = build_optimizer(policy, self.cfg)
        steps = init["total_steps"] * self.algorithm.updates_per_batch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.cfg.schedule, self.cfg.warmup_steps, steps)
        )
        config = build_ds_config(self.cfg, world, self.bf16, init.get("ds_config"))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        if self.cfg.zero_stage == 3:
            deepspeed.zero.register_external_parameter(self.module, policy.get_output_embeddings().weight)
        self.policy = policy
        self.device = self.engine.device

    def _forward(self, part: TrainBatch, with_entropy: bool) -> tuple[Tensor, Tensor | None, list | None]:
        part = _to(part, self.device)
        with moe_context(self.policy, part, self.cfg) as router_logits:
            logprobs, entropy = self.engine(
                part.input_ids, part.attention_mask, part.response_mask, with_entropy
            )
        return logprobs, entropy, router_logits

    def train(self, parts: list[tuple[TrainBatch, Tensor, float, bool]], return_logprobs: bool) -> tuple:
        self.engine.train()
        step = StepParts()
        seen = []
        lr = self.scheduler.get_last_lr()[0]
        for part, weights, share, dummy in parts:
            logprobs, entropy, router_logits = self._forward(part, with_entropy=True)
            loss, metrics = micro_batch_loss(
                self.policy,
                logprobs,
                entropy,
                _to(part, self.device),
                weights.to(self.device),
                router_logits,
                loss_fn=self.loss_fn,
                cfg=self.cfg,
                algorithm=self.algorithm,
                token_share=share,
            )
            # ZeRO averages gradients over ranks; each rank's loss is already its share of the global sum.
            self.engine.backward(loss * self.world)
            if not dummy:
                step.add(metrics, loss, share)
            seen.append(logprobs.detach().cpu() if return_logprobs else None)
        # Every rank must agree before the step; DeepSpeed has no fp32 "skip this step", so a non-finite
        # loss anywhere stops the learner with its weights as they were (nothing NaN is ever applied).
        finite = torch.tensor([1.0 if math.isfinite(step.loss) else 0.0])
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1:
            raise FloatingPointError("non-finite loss on the deepspeed learner; the step was not applied")
        self.engine.step()
        return step, float(self.engine.get_global_grad_norm() or 0.0), lr, seen

    def apply_settings(self, settings: dict) -> None:
        """A curriculum stage's settings (see TorchLearner.apply_settings), on this rank."""
        if settings.get("lr") is not None:
            set_base_lr(self.scheduler, settings["lr"])
        if settings.get("grad_clip") is not None:
            self.cfg = dataclasses.replace(self.cfg, grad_clip=settings["grad_clip"])
            # DeepSpeed reads the clip from its config in the engine and keeps a copy in the ZeRO optimizer.
            self.engine._config.gradient_clipping = settings["grad_clip"]
            if hasattr(self.engine.optimizer, "clip_grad"):
                self.engine.optimizer.clip_grad = settings["grad_clip"]
        if settings.get("loss_kwargs") is not None:
            self.algorithm = dataclasses.replace(self.algorithm, loss_kwargs=dict(settings["loss_kwargs"]))
        if settings.get("temperature") is not None:
            self.module.temperature = settings["temperature"]

    def weights_finite(self) -> bool:
        """This rank's share of the weights (its ZeRO-3 partition, or the full ZeRO-2 copy) is finite."""
        tensors = [getattr(p, "ds_tensor", p.data) for p in self.policy.parameters()]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())

    @torch.no_grad()
    def logprobs(self, parts: list[TrainBatch]) -> list[Tensor]:
        self.engine.eval()
        return [self._forward(part, with_entropy=False)[0].cpu() for part in parts]

    def export(self) -> None:
        """Streams (name, full tensor) to the driver one at a time; ZeRO-3 parameters are gathered one by
        one, so no rank ever holds more than one extra full parameter."""
        import deepspeed

        params = dict(self.policy.named_parameters(remove_duplicate=False))
        buffers = dict(self.policy.named_buffers(remove_duplicate=False))
        for name in self.policy.state_dict(keep_vars=True):
            tensor = params.get(name, buffers.get(name))
            if tensor is None:
                continue
            gathered = hasattr(tensor, "ds_id")
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=gathered):
                if self.rank == 0:
                    send(self.conn, ("tensor", name, tensor.detach().cpu().clone()))
        send(self.conn, ("done",))

    def serve(self) -> None:
        while True:
            request = recv(self.conn)
            kind = request[0]
            try:
                if kind == "close":
                    send(self.conn, ("ok", None))
                    return
                if kind == "export":
                    self.export()
                    continue
                send(self.conn, ("ok", self._handle(kind, request[1:])))
            except Exception:
                send(self.conn, ("error", f"rank {self.rank}: {traceback.format_exc()}"))
                raise

    def _handle(self, kind: str, args: tuple) -> Any:
        if kind == "train":
            return self.train(*args)
        if kind == "logprobs":
            return self.logprobs(*args)
        if kind == "settings":
            return self.apply_settings(*args)
        if kind == "finite":
            return self.weights_finite()
        if kind == "save":
            self.engine.save_checkpoint(args[0], tag="learner", client_state={"version": args[1]})
            return None
        if kind == "load":
            _, client_state = self.engine.load_checkpoint(args[0], tag="learner")
            return (client_state or {}).get("version", 0)
        raise ValueError(f"unknown learner request {kind!r}")


def _to(part: TrainBatch, device: torch.device) -> TrainBatch:
    if part.input_ids.device == device:
        return part
    moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(part).items()}
    return TrainBatch(**moved)


def rank_main(address: tuple[str, int], authkey: bytes) -> None:
    """Entry of every rank once RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are in the environment."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        # DeepSpeed's CPU shared-memory all-reduce serves only inference_all_reduce, yet comm init
        # JIT-compiles it (20-300 s on a busy 2-core box); training collectives go through gloo anyway.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    conn = Client(address, authkey=authkey)
    send(conn, ("hello", rank, world))
    init = recv(conn)
    torch.set_num_threads(int(init.get("threads") or torch.get_num_threads()))
    try:
        server = RankServer(conn, rank, world, init)
    except Exception:
        send(conn, ("error", f"rank {rank} failed to start: {traceback.format_exc()}"))
        raise
    send(conn, ("ready", rank))
    server.serve()
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="one rank of cispo's DeepSpeed learner")
    parser.add_argument("--driver", required=True, help="HOST:PORT the DeepSpeedLearner listens on")
    args = parser.parse_args()
    host, port = args.driver.rsplit(":", 1)
    rank_main((host, int(port)), bytes.fromhex(os.environ["CISPO_LEARNER_AUTHKEY"]))


if __name__ == "__main__":
    main()
