"""`lorastream policy create ID [--objective dpo] [--rank 1] [--lr 5e-5] [--reward NAME]
[--targets attn,mlp] ...`: record how a policy trains (`streams.sdk.policies.create_policy`)."""

from __future__ import annotations

import argparse
import sys

import orjson

from infra.settings import Settings


def add_create(psub: argparse._SubParsersAction) -> None:
    p = psub.add_parser("create", help="create or reconfigure a policy: objective, reward, "
                                       "rank, learning rate, targets (a new catalog record)")
    p.add_argument("policy_id")
    p.add_argument("--objective", choices=("grpo", "sft", "dpo"), default="grpo")
    p.add_argument("--reward", help="reward name (built-in, plugin or HTTP judge); default: "
                                    "each interaction's task")
    p.add_argument("--rank", type=int, help="LoRA rank (default LORASTREAM_LORA_RANK)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default LORASTREAM_LORA_ALPHA)")
    p.add_argument("--targets", help="comma-separated modules or groups: attn, mlp, q_proj, ...")
    p.add_argument("--lr", type=float, dest="learning_rate", help="learning rate")
    p.add_argument("--kl-beta", type=float, help="GRPO's KL coefficient")
    p.add_argument("--clip-eps", type=float, help="GRPO's clip range")
    p.add_argument("--dpo-beta", type=float, help="DPO's beta")
    p.add_argument("--dpo-sft-weight", type=float,
                   help="weight of the chosen answers' NLL added to DPO's loss (RPO)")
    p.add_argument("--namespace", help="tenant (default: unchanged, or 'default')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_policy_create)


def cmd_policy_create(args: argparse.Namespace, settings: Settings) -> int:
    from streams.sdk.policies import CatalogError, PolicyConfigError, create_policy

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    try:
        record = create_policy(
            settings, args.policy_id, objective=args.objective, rank=args.rank,
            alpha=args.alpha, targets=targets, learning_rate=args.learning_rate,
            reward=args.reward, kl_beta=args.kl_beta, clip_eps=args.clip_eps,
            dpo_beta=args.dpo_beta, dpo_sft_weight=args.dpo_sft_weight,
            namespace=args.namespace)
    except (PolicyConfigError, CatalogError) as exc:
        print(f"policy create refused: {exc}", file=sys.stderr)
        return 1
    if args.json:
        data = record.model_dump(mode="json") if record else {"policy_id": args.policy_id,
                                                               "unchanged": True}
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    elif record is None:
        print(f"{args.policy_id}: already configured exactly so")
    else:
        t, lora = record.training, record.lora
        print(f"{record.policy_id}: objective {t.objective}, reward {t.reward or '(task)'}, "
              f"rank {lora.rank} alpha {lora.alpha}, targets {','.join(lora.target_modules)}, "
              f"lr {t.learning_rate or '(default)'}")
    return 0
