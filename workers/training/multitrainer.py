"""GRPO for many policies in shared steps: batched forward/backward passes over their rows.

Same public API as `PolicyTrainer` (step, steps_done, has_policy, adapter_state, checkpoints),
plus `step_many`, which trains several policies in one step: their rows go through batched
passes over the resident base (`workers.training.multilora`), packed under an activation-memory
budget (`workers.training.multipass`), with each group's prompt computed once for its G completions
(`workers.training.sharedprefix`), and each policy steps once. Policies stay isolated:
each policy's loss is normalised by its own token count and the losses are summed (parameters are
disjoint, so each adapter gets exactly its own gradient); gradient norms are clipped per policy;
each policy has its own AdamW, stepped only when that policy was in the step. A policy whose
loss or gradient is not finite is rejected; if anything in a multi-policy pass is not finite the
pass is redone one policy at a time, so a bad policy can never move (or poison through 0 * NaN)
the others.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import wraps
from itertools import accumulate
from pathlib import Path
from typing import Any, TypeVar

import torch

from schemas.errors import PoisonEventError, TrainingRejected
from workers.models.base import LoraSpec, load_base_model
from workers.models.chat import end_ids
from workers.models.packed import packed_head
from workers.models.registry import prepare
from workers.training import checkpoint as ckpt_io
from workers.training.grpo import (
    Batch,
    StepResult,
    TrainGroup,
    make_batch,
    policy_seed,
    validate_groups,
)
from workers.training.multilora import MultiLora
from workers.training.multipass import PASS_ACTIVATION_MB, concat, pack, token_activation_mb
from workers.training.multisample import Completion, SampleRequest, sample_many
from workers.training.objectives import Part, needs_reference, order_groups, policy_loss
from workers.training.packedpass import packed_logps, sliding_window
from workers.training.perpolicy import PolicyTraining, complete, export_targeted, trainable
from workers.training.sharedprefix import Packed, packed_shape, share_prefixes

CHECKPOINT_ABOVE_TOKENS = 512
"""A pass over more (padded) tokens than this recomputes each decoder layer in backward instead
of keeping its activations: a K-policy pass then holds little more than one policy's activation
memory (layer inputs only), so batching policies does not raise the trainer's peak memory."""

StepOutcome = StepResult | TrainingRejected | PoisonEventError


@dataclass
class _Policy:
    slot: int
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    steps: int = 0
    training: PolicyTraining = field(default_factory=PolicyTraining)


@dataclass(frozen=True)
class _Item:
    policy_id: str
    policy: _Policy
    batch: Batch
    parts: list[Part]  # rows of each objective (`workers.training.objectives`)


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Stream agents call the trainer from worker threads; the shared model is not reentrant."""
    @wraps(method)
    def wrapper(self: MultiPolicyTrainer, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


class MultiPolicyTrainer:
    """Many policies' LoRA slots on one frozen base; one AdamW and step count per policy."""

    def __init__(
        self, base_path: Path, lora: LoraSpec, *, lr: float = 2e-2, clip_eps: float = 0.2,
        kl_beta: float = 0.0, max_grad_norm: float = 1.0, temperature: float = 1.0,
        seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
        gradient_checkpointing: bool = False,
        checkpoint_above_tokens: int | None = CHECKPOINT_ABOVE_TOKENS,
        max_grad_norm_reject: float | None = None,
        pass_activation_mb: float | None = PASS_ACTIVATION_MB,
    ) -> None:
        self.base, self.tokenizer = load_base_model(Path(base_path), device=device, dtype=dtype)
        self.family = prepare(self.base)
        self.device = torch.device(device)
        self.multi = MultiLora.install(self.base, lora.target_modules)
        self._sliding = sliding_window(self.base.config)
        self.lora, self.lr, self.clip_eps, self.kl_beta = lora, lr, clip_eps, kl_beta
        self.max_grad_norm, self.temperature, self.seed = max_grad_norm, temperature, seed
        self.gradient_checkpointing = gradient_checkpointing  # True: every pass
        self.checkpoint_above_tokens = checkpoint_above_tokens
        # A pre-clip gradient norm above this rejects the step (clipping would hide a blow-up).
        self.max_grad_norm_reject = max_grad_norm_reject
        self.pass_activation_mb = pass_activation_mb  # None: every policy of a step in one pass
        # HF checkpoints a layer only in train mode, so `_pass` picks per pass with .train().
        self.base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        self.base.eval()
        self._policies: dict[str, _Policy] = {}
        self._training: dict[str, PolicyTraining] = {}  # `configure`d policies
        self._next_slot = 0
        self._lock = threading.RLock()
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self._vocab = int(self.base.get_output_embeddings().weight.shape[0])
        self._token_mb = token_activation_mb(self.base.config, dtype)
        self._dtype = dtype
        self._sampling_head = packed_head(self.base)  # sampling's head (workers.models.packed)

    def has_policy(self, policy_id: str) -> bool:
        return policy_id in self._policies

    def policies(self) -> list[str]:
        return list(self._policies)

    @_locked
    def drop_policy(self, policy_id: str) -> bool:
        """Forget a policy (its slot's parameters and optimizer state); True if it was held.
        The update stage calls this only for a policy whose newest step is journaled."""
        policy = self._policies.pop(policy_id, None)
        if policy is None:
            return False
        self.multi.remove_slot(policy.slot)
        return True

    def steps_done(self, policy_id: str) -> int:
        policy = self._policies.get(policy_id)
        return policy.steps if policy else 0

    def slot_of(self, policy_id: str) -> int:
        """The policy's routing slot (for sampling from its live adapter)."""
        return self._require(policy_id).slot

    def _policy(self, policy_id: str) -> _Policy:
        """Get or create; the init depends only on (seed, policy_id), as in PolicyTrainer."""
        if policy_id in self._policies:
            return self._policies[policy_id]
        gen = torch.Generator().manual_seed(policy_seed(self.seed, policy_id))
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        training = self.training_of(policy_id)
        params = self.multi.add_slot(slot, training.lora.rank, training.lora.alpha, gen)
        params = trainable(self.multi, slot, params, training.lora)
        policy = _Policy(slot, params, self._new_optimizer(params, training.lr), 0, training)
        self._policies[policy_id] = policy
        return policy

    def training_of(self, policy_id: str) -> PolicyTraining:
        """The policy's own configuration, else the trainer's (the pipeline's) defaults."""
        return self._training.get(policy_id) or PolicyTraining(
            self.lora, self.lr, self.clip_eps, self.kl_beta)

    @_locked
    def configure(self, policy_id: str, training: PolicyTraining) -> None:
        """Give a policy its own configuration; it applies from its next step. A new adapter
        shape (rank, alpha, targets) restarts the policy's adapter and optimiser."""
        self._training[policy_id] = training
        policy = self._policies.get(policy_id)
        if policy is None or policy.training == training:
            return
        if policy.training.lora != training.lora:
            steps = policy.steps
            del self._policies[policy_id]
            self.multi.remove_slot(policy.slot)
            self._policy(policy_id).steps = steps
            return
        for group in policy.optimizer.param_groups:
            group["lr"] = training.lr
        policy.training = training

    def _new_optimizer(self, params: list[torch.nn.Parameter],
                       lr: float | None = None) -> torch.optim.AdamW:
        # No weight decay: a zero-advantage step must not shrink the adapter. Fused: one kernel
        # for all of a policy's LoRA tensors, several times faster than foreach on CPU
        # (docs/performance.md); the same update up to rounding.
        return torch.optim.AdamW(params, lr=self.lr if lr is None else lr, weight_decay=0.0,
                                 fused=True)

    def _require(self, policy_id: str) -> _Policy:
        if policy_id not in self._policies:
            raise KeyError(f"unknown policy {policy_id!r}")
        return self._policies[policy_id]

    # -- the batched GRPO pass ----------------------------------------------------------------
    def _logps(self, packed: Packed, shape: tuple[int, int], keep_head: bool) -> torch.Tensor:
        return packed_logps(self.base, packed, shape, temperature=self.temperature,
                            dtype=self._dtype, sliding=self._sliding, keep_head=keep_head)

    def _ref_logps(self, packed: Packed, shape: tuple[int, int],
                   needed: bool) -> torch.Tensor | None:
        """One shared base pass (LoRA off for every row) is the KL and DPO reference of all
        policies."""
        if not needed:
            return None
        with torch.no_grad(), self.multi.route([None] * packed.ids.shape[0]):
            return self._logps(packed, shape, keep_head=False)

    def _pass(self, items: list[_Item]) -> dict[str, tuple[float, float, float] | None]:
        """Forward + backward over all items' rows; per policy (loss, kl, clipped grad norm),
        or None when something of that policy is not finite. Grads are left in place."""
        batch = concat([it.batch for it in items], self._pad_id)
        row_slots: list[int | None] = [it.policy.slot for it in items
                                       for _ in range(it.batch.ids.shape[0])]
        packed = share_prefixes(batch, row_slots, self._pad_id).to(self.device)
        batch = _batch_to(batch, self.device)
        shape = (batch.ids.shape[0], batch.ids.shape[1] - 1)
        ref = self._ref_logps(packed, shape, any(
            needs_reference(it.policy.training, it.parts) for it in items))
        ends = list(accumulate(it.batch.ids.shape[0] for it in items))
        bounds = zip([0, *ends[:-1]], ends, strict=True)
        limit = self.checkpoint_above_tokens
        recompute = self.gradient_checkpointing or (limit is not None and packed.tokens > limit)
        self.base.train(recompute)  # dropout is 0: train mode only checkpoints
        out: dict[str, tuple[float, float, float] | None] = {}
        try:
            with self.multi.route(packed.slots):  # kept through backward: for recomputation
                logp = self._logps(packed, shape, keep_head=not recompute)
                total: torch.Tensor | None = None
                for it, (s, e) in zip(items, bounds, strict=True):
                    loss, kl = policy_loss(it.parts, it.policy.training, logp[s:e],
                                           batch.old[s:e], None if ref is None else ref[s:e],
                                           batch.adv[s:e], batch.cmask[s:e, 1:])
                    if not torch.isfinite(loss):
                        out[it.policy_id] = None
                        continue
                    out[it.policy_id] = (float(loss.detach()), kl, 0.0)
                    total = loss if total is None else total + loss
                if total is not None and total.requires_grad:
                    total.backward()
        finally:
            self.base.eval()
        for it in items:
            done = out[it.policy_id]
            if done is None:
                continue
            grads = [p for p in it.policy.params if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm) if grads else \
                torch.tensor(0.0)
            out[it.policy_id] = (done[0], done[1], float(norm)) if torch.isfinite(norm) else None
        return out

    @staticmethod
    def _clear(items: list[_Item]) -> None:
        for it in items:
            for p in it.policy.params:
                p.grad = None

    @_locked
    def step_many(self, batches: dict[str, list[TrainGroup]]) -> dict[str, StepOutcome]:
        """Every policy's groups in batched passes (packed under `pass_activation_mb`); each
        valid policy steps once, exactly as it would alone.

        Returns, per policy, its StepResult or the exception that rejected it (poison input,
        non-finite reward/loss/gradient); a rejected policy's adapter and optimizer are untouched.
        """
        results: dict[str, StepOutcome] = {}
        items: list[_Item] = []
        for policy_id, groups in batches.items():
            try:
                validate_groups(groups, self._vocab)
                ordered, parts = order_groups(groups)
            except (PoisonEventError, TrainingRejected) as exc:
                results[policy_id] = exc
                continue
            items.append(_Item(policy_id, self._policy(policy_id),
                               make_batch(ordered, self._pad_id), parts))
        shapes = [packed_shape(it.batch) for it in items]
        for chunk in pack(shapes, self._token_mb, self.pass_activation_mb):
            self._train([items[i] for i in chunk], results)
        return {policy_id: results[policy_id] for policy_id in batches}

    def _train(self, items: list[_Item], results: dict[str, StepOutcome]) -> None:
        """One pass over `items`, then each valid policy steps; if anything in a multi-policy
        pass is not finite, the pass is redone one policy at a time (no 0 * NaN poisoning)."""
        self._clear(items)
        outcome = self._pass(items)
        if len(items) > 1 and any(v is None for v in outcome.values()):
            self._clear(items)
            outcome = {}
            for it in items:
                outcome.update(self._pass([it]))
        for it in items:
            self._apply(it, outcome[it.policy_id], results)

    def _apply(self, it: _Item, done: tuple[float, float, float] | None,
               results: dict[str, StepOutcome]) -> None:
        reject = self.max_grad_norm_reject
        if done is None:
            results[it.policy_id] = TrainingRejected(
                f"non-finite loss or gradient for policy {it.policy_id!r}")
        elif reject is not None and done[2] > reject:
            results[it.policy_id] = TrainingRejected(
                f"exploding gradient for policy {it.policy_id!r}: pre-clip norm {done[2]:.4g} "
                f"exceeds max_grad_norm_reject {reject:g}")
        else:
            it.policy.optimizer.step()
            it.policy.steps += 1
            loss, kl, norm = done
            results[it.policy_id] = StepResult(
                step=it.policy.steps, loss=loss, mean_reward=it.batch.mean_reward, kl=kl,
                grad_norm=norm, tokens=int(it.batch.cmask.sum()))
        for p in it.policy.params:
            p.grad = None

    def step(self, policy_id: str, groups: list[TrainGroup]) -> StepResult:
        """One policy's step (PolicyTrainer's API); raises what step_many would return."""
        result = self.step_many({policy_id: groups})[policy_id]
        if isinstance(result, Exception):
            raise result
        return result

    # -- weights, sampling, checkpoints ------------------------------------------------------
    @_locked
    @torch.no_grad()
    def logits(self, policy_id: str, input_ids: torch.Tensor) -> torch.Tensor:
        """The policy's logits for a batch (export round-trip checks and debugging)."""
        slot = self._require(policy_id).slot
        with self.multi.route([slot] * input_ids.shape[0]):
            return self.base(input_ids=input_ids.to(self.device)).logits.float().cpu()

    @_locked
    def sample_many(
        self, requests: Sequence[tuple[list[int], str | None, int]], *, max_new_tokens: int,
        seed: int | None = None, stop_at_eos: bool = True,
    ) -> list[list[Completion]]:
        """(prompt ids, policy or None, n) requests from the LIVE adapters, in one pass, at the
        trainer's temperature, so the log-probs are this trainer's own GRPO `old` term.
        `stop_at_eos=False` always samples `max_new_tokens` (fixed-size work for benchmarks)."""
        reqs = [SampleRequest(prompt, None if pid is None else self._policy(pid).slot, n)
                for prompt, pid, n in requests]
        eos = end_ids(self.tokenizer, self.base) if stop_at_eos else frozenset()
        return sample_many(self.base, self.multi, reqs, max_new_tokens=max_new_tokens,
                           temperature=self.temperature, eos_ids=eos, pad_id=self._pad_id,
                           seed=seed, head=self._sampling_head)

    @_locked
    def adapter_state(self, policy_id: str) -> dict[str, torch.Tensor]:
        """PEFT saved-key format (adapter name stripped), ready to export as a revision."""
        policy = self._require(policy_id)
        return export_targeted(self.multi, policy.slot, policy.training.lora)

    def _set_weights(self, policy: _Policy, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self.multi.load(policy.slot, complete(self.multi, policy.slot,
                                                  policy.training.lora, tensors))
        except ValueError as exc:
            raise PoisonEventError(str(exc)) from exc

    @_locked
    def load_adapter_weights(
        self, policy_id: str, tensors: dict[str, torch.Tensor], *, step: int | None = None
    ) -> None:
        """Start (or restart) a policy from exported weights with a fresh optimizer."""
        policy = self._policy(policy_id)
        self._set_weights(policy, tensors)
        policy.optimizer = self._new_optimizer(policy.params, policy.training.lr)
        if step is not None:
            policy.steps = step

    @_locked
    def save_checkpoint(self, policy_id: str, directory: Path) -> None:
        """Adapter + AdamW moments as safetensors, hyper-params + step as JSON (no pickle)."""
        policy, adapter = self._require(policy_id), self.adapter_state(policy_id)
        ckpt_io.save(directory, policy_id=policy_id, step=policy.steps, lora=policy.training.lora,
                     adapter=adapter, optimizer=policy.optimizer, keys=list(adapter),
                     shapes=[list(p.shape) for p in policy.params])

    @_locked
    def load_checkpoint(self, policy_id: str, directory: Path) -> None:
        """Resume exactly where save_checkpoint left off (weights, moments, step)."""
        ckpt = ckpt_io.load(directory, self.training_of(policy_id).lora)
        policy = self._policy(policy_id)
        optimizer = self._new_optimizer(policy.params, policy.training.lr)
        ckpt.restore_optimizer(optimizer, policy.params)  # checks shapes before any change
        self._set_weights(policy, ckpt.adapter)
        policy.optimizer = optimizer
        policy.steps = ckpt.step


def _batch_to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    return dataclasses.replace(batch, cmask=batch.cmask.to(device), old=batch.old.to(device),
                               adv=batch.adv.to(device))
