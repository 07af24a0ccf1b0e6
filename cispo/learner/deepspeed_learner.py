"""The "deepspeed" learner: ZeRO-2/3 data parallelism over N rank processes, driven from the trainer.

The trainer holds a DeepSpeedLearner, a facade with the Learner interface; the ranks are separate
processes, each owning one DeepSpeed engine (cispo/learner/deepspeed_rank.py):

    learner = build_learner("deepspeed", model=model, cfg=cfg.learner, algorithm=cfg.algorithm,
                            total_steps=cfg.experiment.total_steps, temperature=cfg.rollout.temperature)
    result = learner.train_step(minibatch)             # StepResult: one optimizer step over all ranks
    for name, tensor in learner.iter_weights_for_sync(): ...   # or state_dict_for_sync()
    learner.close()

One train_step: the driver computes the normalisation weights over the whole minibatch (so the per-token
weights are global), splits the rows over ranks balancing tokens, cuts each rank's rows into token-budget
micro-batches (learner.micro_batch_tokens), pads every rank to the same number of micro-batches with
zero-weight dummies (ZeRO reduce-scatters inside every backward, so ranks must run the same number), and
sends each rank its list. Each rank backpropagates world_size * (its share of the global loss), since
ZeRO averages gradients over ranks, and the gradients summed over micro-batches and ranks are the
full-minibatch gradient; engine.step() clips by the global norm and applies AdamW.

Optimizer: torch.optim.AdamW(betas, eps=1e-15) handed to deepspeed.initialize (DeepSpeed's FusedAdam
is CUDA-only and its CPUAdam JIT-compiles; torch's runs on the flat ZeRO partitions as they are).
Precision: fp32, or bf16 with fp32 master weights when the model's parameters are bf16.

Launchers
- launcher="spawn" (default): the driver starts learner.num_ranks local subprocesses
  (python -m cispo.learner.deepspeed_rank), sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and
  OMP_NUM_THREADS for each; on CPU the ranks set DS_ACCELERATOR=cpu (DeepSpeed then uses gloo). One rank
  per GPU on a single node.
- launcher="external" (multi-node): the driver listens on driver_address (host, port) with the shared
  secret CISPO_LEARNER_AUTHKEY (hex) and waits for learner.num_ranks ranks started by a launcher:

      export CISPO_LEARNER_AUTHKEY=$(python -c "import secrets; print(secrets.token_hex(16))")
      # on each of the 4 nodes, 8 GPUs each (learner.num_ranks=32):
      torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29400 \
          -m cispo.learner.deepspeed_rank --driver $DRIVER_HOST:$DRIVER_PORT
      # or: deepspeed --hostfile hosts --num_gpus 8 --module cispo.learner.deepspeed_rank --driver ...

  The model travels from the driver to every rank pickled; for large models pass `model` as a picklable
  zero-argument callable that builds (or loads) it on the rank instead.

Model construction: the policy is built normally (all weights initialised) and only then handed to
deepspeed.initialize, which partitions it. transformers' MiniMax built inside deepspeed.zero.Init leaves
its router and expert weights uninitialised (NaN loss): tests/learner/test_deepspeed_learner.py shows it.

Weights for sync: iter_weights_for_sync() yields (name, tensor) pairs as rank 0 gathers each ZeRO-3
parameter (GatheredParameters, one parameter at a time), so neither a rank nor the driver holds a second
full copy of the model while streaming; state_dict_for_sync() builds a dict from it for callers that want
one.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cispo.algo.losses import normalization_weights
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.types import StepResult, TrainBatch
from cispo.learner import register_learner
from cispo.learner.common import StepParts, wants_packing
from cispo.learner.deepspeed_rank import recv, send
from cispo.learner.micro_batches import Plan, plan_micro_batches


def _dummy(batch: TrainBatch) -> TrainBatch:
    """One real row with nothing trained: runs the forward/backward collectives, adds zero gradient."""
    part = batch.select([0])
    part.response_mask = torch.zeros_like(part.response_mask)
    return part


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@register_learner("deepspeed")
class DeepSpeedLearner:
    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        cfg: LearnerConfig,
        algorithm: AlgorithmConfig,
        *,
        total_steps: int = 1000,
        temperature: float = 1.0,
        launcher: str = "spawn",
        driver_address: tuple[str, int] | None = None,
        ds_config: dict[str, Any] | None = None,
        threads_per_rank: int = 1,
        start_timeout_s: float = 600.0,
    ) -> None:
        if launcher not in ("spawn", "external"):
            raise ValueError(f"launcher must be 'spawn' or 'external', got {launcher!r}")
        self.check_config(cfg)
        self.cfg, self.algorithm, self.world = cfg, algorithm, cfg.num_ranks
        self.version = 0
        packing = (
            wants_packing(model, cfg)
            if isinstance(model, nn.Module)
            else bool(getattr(cfg, "packing", False))
        )
        if launcher == "external":
            authkey = bytes.fromhex(os.environ["CISPO_LEARNER_AUTHKEY"])
            self._listener = Listener(driver_address or ("0.0.0.0", 29600), authkey=authkey)
        else:
            authkey = secrets.token_bytes(16)
            self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self._procs = self._spawn(authkey, threads_per_rank) if launcher == "spawn" else []
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._listener)
        self._conns = self._accept(start_timeout_s)
        init = {
            "model": model,
            "cfg": cfg,
            "algorithm": algorithm,
            "total_steps": total_steps,
            "temperature": temperature,
            "packing": packing,
            "ds_config": ds_config,
            "threads": threads_per_rank,
        }
        for conn in self._conns:
            send(conn, init)
        for rank in range(self.world):
            self._expect(rank, "ready")

    @staticmethod
    def check_config(cfg: LearnerConfig) -> None:
        """What only this backend requires of learner.* (run at start-up, before any model is built)."""
        if cfg.zero_stage not in (2, 3):
            raise ValueError(f"learner.zero_stage must be 2 or 3 (deepspeed learner), got {cfg.zero_stage}")
        if cfg.num_ranks < 1:
            raise ValueError(f"learner.num_ranks must be >= 1, got {cfg.num_ranks}")

    def _spawn(self, authkey: bytes, threads: int) -> list[subprocess.Popen]:
        # Subprocesses running the same module an external launcher runs (not multiprocessing "spawn",
        # which re-imports the driver's __main__ and so breaks unguarded scripts).
        port = _free_port()
        host, listen_port = self._listener.address
        procs = []
        for rank in range(self.world):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(self.world),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(self.world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(threads),
                "CISPO_LEARNER_AUTHKEY": authkey.hex(),
            }
            env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cispo" / "torch_extensions"))
            command = [
                sys.executable,
                "-m",
                "cispo.learner.deepspeed_rank",
                "--driver",
                f"{host}:{listen_port}",
            ]
            procs.append(subprocess.Popen(command, env=env))
        return procs

    def _accept(self, timeout_s: float) -> list[Connection]:
        conns: dict[int, Connection] = {}
        # Listener.accept has no timeout of its own; one on its socket bounds a launch that never arrives.
        self._listener._listener._socket.settimeout(timeout_s)
        while len(conns) < self.world:
            conn = self._listener.accept()
            _, rank, world = recv(conn)
            if world != self.world:
                raise RuntimeError(f"rank {rank} reports WORLD_SIZE={world}, learner.num_ranks={self.world}")
            conns[rank] = conn
        return [conns[r] for r in range(self.world)]

    def _recv(self, rank: int) -> tuple:
        conn = self._conns[rank]
        while not conn.poll(1.0):
            if self._procs and self._procs[rank].poll() is not None:
                code = self._procs[rank].returncode
                self.close(force=True)
                raise RuntimeError(f"learner rank {rank} died (exit code {code})")
        message = recv(conn)
        if message[0] == "error":
            self.close(force=True)
            raise RuntimeError(f"deepspeed learner failed; the learner is closed.\n{message[1]}")
        return message

    def _expect(self, rank: int, kind: str) -> tuple:
        message = self._recv(rank)
        if message[0] != kind:
            raise RuntimeError(f"rank {rank} answered {message[0]!r}, expected {kind!r}")
        return message

    def _broadcast(self, requests: list[tuple]) -> list[Any]:
        for conn, request in zip(self._conns, requests):
            send(conn, request)
        return [self._expect(rank, "ok")[1] for rank in range(self.world)]

    def train_step(self, batch: TrainBatch, return_logprobs: bool = False) -> StepResult:
        """One optimizer step on one minibatch over all ranks (see the module docstring)."""
        weights = normalization_weights(batch.response_mask, self.algorithm.normalizer, batch.group_ids)
        tokens = max(batch.num_response_tokens(), 1)
        plan = plan_micro_batches(batch, self.world, self.cfg.micro_batch_tokens)
        requests = []
        for rank_plan in plan:
            parts = []
            for rows in rank_plan:
                if rows is None:
                    dummy = _dummy(batch)
                    parts.append((dummy, torch.zeros_like(dummy.old_logprobs), 0.0, True))
                    continue
                part = batch.select(rows)
                share = part.num_response_tokens() / tokens
                parts.append((part, weights[rows, : part.input_ids.shape[1]], share, False))
            requests.append(("train", parts, return_logprobs))
        replies = self._broadcast(requests)
        step = StepParts()
        for rank_parts, *_ in replies:
            step.merge(rank_parts)
        # Every rank saw the same global norm and lr.
        _, grad_norm, lr, _ = replies[0]
        self.version += 1
        logprobs = self._scatter(batch, plan, [r[3] for r in replies]) if return_logprobs else None
        return StepResult(step.result(grad_norm, lr), logprobs)

    @staticmethod
    def _scatter(batch: TrainBatch, plan: Plan, outputs: list[list[torch.Tensor | None]]) -> torch.Tensor:
        out = torch.zeros_like(batch.old_logprobs)
        for rank_plan, rank_out in zip(plan, outputs):
            for rows, values in zip(rank_plan, rank_out):
                if rows is not None and values is not None:
                    out[rows, : values.shape[1]] = values
        return out

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        plan = plan_micro_batches(batch, self.world, self.cfg.micro_batch_tokens)
        requests = [
            ("logprobs", [_dummy(batch) if rows is None else batch.select(rows) for rows in p]) for p in plan
        ]
        return self._scatter(batch, plan, self._broadcast(requests))

    def iter_weights_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) pairs in state_dict order, streamed as rank 0 gathers them. Consume it to
        the end (a generator closed early drains the rest, since every rank takes part in each gather)."""
        for conn in self._conns:
            send(conn, ("export",))
        message: tuple = ("",)
        try:
            while True:
                message = self._recv(0)
                if message[0] == "done":
                    break
                yield message[1], message[2]
        finally:
            while message[0] != "done":
                message = self._recv(0)
            for rank in range(1, self.world):
                self._expect(rank, "done")

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        return dict(self.iter_weights_for_sync())

    def apply_settings(self, **settings) -> None:
        """A curriculum stage's settings on every rank, from the next train_step on (the normaliser here:
        this facade computes the token weights)."""
        if settings.get("normalizer") is not None:
            self.algorithm = dataclasses.replace(self.algorithm, normalizer=settings["normalizer"])
        if settings.get("loss_kwargs") is not None:
            self.algorithm = dataclasses.replace(self.algorithm, loss_kwargs=dict(settings["loss_kwargs"]))
        self._broadcast([("settings", settings)] * self.world)

    def weights_finite(self) -> bool:
        return all(self._broadcast([("finite",)] * self.world))

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._broadcast([("save", str(Path(directory).resolve()), self.version)] * self.world)

    def load(self, directory: str) -> None:
        self.version = int(self._broadcast([("load", str(Path(directory).resolve()))] * self.world)[0])

    def close(self, force: bool = False) -> None:
        if not force and self._finalizer.alive:
            try:
                self._broadcast([("close",)] * self.world)
            except (RuntimeError, OSError, EOFError):
                pass
        self._finalizer()


def _shutdown(procs: list[subprocess.Popen], listener: Listener) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=5)
    listener.close()
