"""The export stage: `updates` → `exports`. Every trainer step is noted for provenance; a staged
checkpoint becomes an adapter-only revision (PEFT `adapter_config.json` +
`adapter_model.safetensors`) in the content-addressed artifact store, numbered by the catalog
(gapless; the same trainer step always gets the same number).
"""

from __future__ import annotations

from pydantic import BaseModel

from schemas.catalog import LoraConfig
from schemas.events import AdapterExported, PolicyUpdated
from schemas.ids import derive_id
from workers.artifacts.store import ArtifactRef, adapter_config
from workers.catalog.archive import archive
from workers.catalog.provenance import StepLog, build_provenance, cached_base_hash
from workers.pipeline.context import StageContext
from workers.pipeline.stage import Stage, single


def export(ctx: StageContext, event: PolicyUpdated) -> list[BaseModel]:
    """Write the staged adapter as a content-addressed PEFT revision and number it."""
    StepLog(ctx.settings, ctx.state.r).note(event)  # until the revision it ends up in is recorded
    if event.checkpoint is None:
        return []
    tensors = ctx.store.load_staged(event.checkpoint)
    base_name = str(ctx.base_path)
    lora = ctx.configs.get(event.policy_id).lora  # the policy's own shape
    ref = ctx.store.put_adapter(tensors, adapter_config(lora, base_name))
    revision = record_revision(ctx, event, ref)
    return [
        AdapterExported(
            event_id=derive_id("export", event.policy_id, event.step),
            policy_id=event.policy_id,
            revision=revision,
            step=event.step,
            parent_revision=revision - 1,
            sha256=ref.sha256,
            path=ctx.store.location(ref.path),
            size_bytes=ref.size_bytes,
            rank=lora.rank,
            alpha=lora.alpha,
            base_model=base_name,
        )
    ]


def record_revision(ctx: StageContext, event: PolicyUpdated, ref: ArtifactRef) -> int:
    """Register the policy if new, record the revision with its provenance, return its number."""
    catalog, pid = ctx.catalog, event.policy_id
    base_hash = cached_base_hash(str(ctx.base_path))
    lora = ctx.configs.get(pid).lora
    catalog.register(pid, base_model=str(ctx.base_path), base_model_hash=base_hash,
                     lora=LoraConfig(rank=lora.rank, alpha=lora.alpha,
                                     target_modules=lora.target_modules))
    entry = catalog.entry(pid)
    parent_step = entry.revisions[entry.head].step if entry.head else 0
    steps = StepLog(ctx.settings, ctx.state.r)
    notes = steps.steps(pid, after=parent_step, upto=event.step)
    provenance = build_provenance(ctx.settings, notes, parent=entry.head, base_hash=base_hash,
                                  first_step=parent_step + 1, last_step=event.step,
                                  fallback_ts=event.ts)
    provenance = archive(ctx.settings, ctx.store, pid, event.step, provenance)
    record = catalog.record_revision(pid, step=event.step, sha256=ref.sha256,
                                     size_bytes=ref.size_bytes, provenance=provenance)
    steps.forget(pid, upto=event.step)
    return record.revision


STAGE = Stage(name="export", reads="updates", event=PolicyUpdated, handle=single(export),
              writes="exports", requires=("base_model",))
