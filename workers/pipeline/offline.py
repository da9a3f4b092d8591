"""Logged targets and preference pairs as rollout groups: how SFT and DPO data reach the update
stage through the same topics, ids, journal and provenance as sampled GRPO groups.

The rollout stage hands every training interaction whose objective (its own, else its
policy's) is `sft` or `dpo` to `offline_rollout` instead of the engine. Nothing is sampled: the
group's prompt is rendered as a sampled one is (`workers.models.chat.render_prompt`: the base's
chat template, if any) and its completions are the logged texts, each ended with the base's
end-of-turn id so a policy also learns where to stop; log-probs are unused (zeros) and the
revision is 0.

- `sft`: one target per interaction: `reference`, else `chosen`, else a `response` the user
  rated positively. A response rated zero or below is not a target: it is skipped (logged),
  never trained on; an interaction with none of these is poison.
- `dpo`: an interaction with `chosen` and `rejected` is one pair. A `response` with `feedback`
  waits in Redis (`pairs:<policy>`, keyed by the prompt) for another response to the same
  prompt with a different rating; the better rated one is chosen. The pair's rollout is
  emitted by the interaction that completed it (its id derives from that one's), and what was
  paired is recorded in the same transaction, so a redelivered interaction emits the same pair
  again or nothing, never a second pair.

Logged data is not sampled from the policy, so it takes no in-flight slot
(`workers.pipeline.inflight`): staleness does not apply to it.
"""

from __future__ import annotations

import functools
import hashlib
import logging

import orjson

from schemas.errors import PoisonEventError
from schemas.events import Completion, InteractionLogged, RolloutGenerated
from schemas.ids import derive_id
from workers.keys import RedisKeys
from workers.pipeline.context import StageContext

log = logging.getLogger(__name__)

PAIRS_TTL_S = 7 * 24 * 3600
MAX_WAITING = 16
"""Logged responses kept per prompt while they wait for a partner (the oldest go first)."""


def offline_rollout(ctx: StageContext, interaction: InteractionLogged,
                    objective: str) -> RolloutGenerated | None:
    """The group an `sft` or `dpo` interaction trains on, or None when it has none (yet)."""
    if objective == "sft":
        target = sft_target(interaction)
        if target is None:
            log.info("sft: %s (%s) is a response rated %s: not a target, skipped",
                     interaction.event_id, interaction.policy_id, interaction.feedback)
            return None
        return _group(ctx, interaction, [target], objective)
    if interaction.chosen is not None and interaction.rejected is not None:
        return _group(ctx, interaction, [interaction.chosen, interaction.rejected], objective)
    if interaction.response is None or interaction.feedback is None:
        raise PoisonEventError("objective dpo needs 'chosen' and 'rejected', or a 'response' "
                               "with 'feedback' to pair with another response to the prompt")
    partner = Pairs(ctx).offer(interaction)
    if partner is None:
        return None
    better, worse = ((interaction, partner) if interaction.feedback > (partner.feedback or 0.0)
                     else (partner, interaction))
    return _group(ctx, interaction, [better.response or "", worse.response or ""], objective,
                  partner=partner)


def sft_target(interaction: InteractionLogged) -> str | None:
    """What an sft interaction imitates; None for a response its user did not like."""
    for text in (interaction.reference, interaction.chosen):
        if text is not None:
            return text
    if interaction.response is not None and interaction.feedback is not None:
        return interaction.response if interaction.feedback > 0 else None
    raise PoisonEventError("objective sft needs a target: 'reference', 'chosen', or a "
                           "'response' with positive 'feedback'")


def _group(ctx: StageContext, interaction: InteractionLogged, texts: list[str], objective: str,
           partner: InteractionLogged | None = None) -> RolloutGenerated:
    from workers.models.chat import render_prompt

    tok = ctx.tokenizer
    eos = turn_end_id(str(ctx.base_path), int(tok.eos_token_id))
    try:
        prompt_ids = render_prompt(tok, interaction.prompt, interaction.chat())
    except ValueError as exc:
        raise PoisonEventError(str(exc)) from exc
    completions = []
    for text in texts:
        ids = [*tok(text, add_special_tokens=False)["input_ids"], eos]
        completions.append(Completion(text=text, token_ids=ids, logprobs=[0.0] * len(ids)))
    return RolloutGenerated(
        event_id=derive_id("rollout", interaction.event_id), policy_id=interaction.policy_id,
        interaction=interaction, revision=0,
        prompt_ids=prompt_ids, completions=completions,
        temperature=ctx.settings.temperature, objective=objective,  # type: ignore[arg-type]
        partner=partner)


@functools.lru_cache(maxsize=8)
def turn_end_id(base: str, tokenizer_eos: int) -> int:
    """The id a target ends with: the base's generation config's first end id (what a chat
    model ends a turn with, e.g. SmolLM2's `<|im_end|>`), else the tokenizer's EOS."""
    from transformers import GenerationConfig

    try:
        declared = GenerationConfig.from_pretrained(base).eos_token_id
    except OSError:
        declared = None
    if isinstance(declared, list):
        declared = declared[0] if declared else None
    return tokenizer_eos if declared is None else int(declared)


class Pairs:
    """Logged responses waiting for a partner, per policy: one Redis hash.

    Fields: `w:<prompt hash>` the waiting interactions (JSON list); `d:<event id>` the partner
    of an interaction that completed a pair (to emit the same pair again on redelivery);
    `u:<event id>` an interaction used as a partner (its redelivery emits nothing).
    """

    def __init__(self, ctx: StageContext) -> None:
        self.r = ctx.state.r
        self.keys = RedisKeys(ctx.settings)

    def offer(self, interaction: InteractionLogged) -> InteractionLogged | None:
        """The partner this interaction completes a pair with, else None (it waits)."""
        key, me = self.keys.pairs(interaction.policy_id), interaction.event_id
        slot = "w:" + hashlib.sha256(interaction.prompt.encode()).hexdigest()[:24]
        done, used, waiting_raw = self.r.hmget(key, f"d:{me}", f"u:{me}", slot)
        if done is not None:
            return InteractionLogged.model_validate_json(done)
        if used is not None:
            return None
        waiting = [InteractionLogged.model_validate_json(w)
                   for w in _loads_list(waiting_raw)]
        if any(w.event_id == me for w in waiting):
            return None
        partner = next((w for w in waiting if w.feedback != interaction.feedback), None)
        pipe = self.r.pipeline(transaction=True)
        if partner is None:
            waiting = [*waiting, interaction][-MAX_WAITING:]
        else:
            waiting = [w for w in waiting if w.event_id != partner.event_id]
            pipe.hset(key, mapping={f"d:{me}": partner.model_dump_json(),
                                    f"u:{partner.event_id}": 1})
        pipe.hset(key, slot, _dumps_list([w.model_dump_json() for w in waiting]))
        pipe.expire(key, PAIRS_TTL_S)
        pipe.execute()
        return partner


def _loads_list(raw: bytes | str | None) -> list[str]:
    return list(orjson.loads(raw)) if raw else []


def _dumps_list(items: list[str]) -> str:
    return orjson.dumps(items).decode()
