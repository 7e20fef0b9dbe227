"""`gptoss-jax finetune BASE DATA.jsonl --out DIR` and `gptoss-jax merge BASE --adapters DIR --out OUT`: the
arguments and the calls into `training.finetune` and `training.merge.merge`.

Light to import (argparse only at module level): the CLI builds every command's parser on each start.
"""

from __future__ import annotations

import argparse
import sys


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """The `finetune` options (the base model's path and --mesh, --dtype, ... come from the CLI)."""
    p.add_argument(
        "data", help="chat JSONL in OpenAI's fine-tuning format (messages, tool_calls, tools, thinking)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: adapters (PEFT format), checkpoints/, loss.csv, "
        "loss.png; run again with the same folder to resume",
    )
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    g.add_argument(
        "--alpha",
        type=float,
        default=32.0,
        help="LoRA alpha; the update is scaled by alpha/rank (default 32)",
    )
    g.add_argument(
        "--targets",
        default="default",
        help="comma-separated among q, k, v, o, router, mlp1 (experts' gate/up), mlp2 (down), or attn, "
        "experts, all; default: q,k,v,o,mlp1,mlp2",
    )
    g.add_argument(
        "--full",
        action="store_true",
        help="full fine-tuning of every weight instead of LoRA (experts "
        "dequantized; writes checkpoints only)",
    )
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    t.add_argument(
        "--schedule",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="after the warm-up (default cosine to 0)",
    )
    t.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    n = t.add_mutually_exclusive_group()
    n.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    n.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    t.add_argument(
        "--batch",
        type=int,
        default=4,
        help="rows of --seq-len tokens per micro-batch, all devices together (default 4)",
    )
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    t.add_argument("--seed", type=int, default=0, help="adapter initialisation and data order (default 0)")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    t.add_argument("--no-pack", action="store_true", help="one conversation per row (default: pack several)")
    t.add_argument("--all-tokens", action="store_true", help="loss on every token (default: assistant only)")
    t.add_argument(
        "--no-remat", action="store_true", help="keep activations instead of recomputing each layer"
    )
    h = p.add_argument_group("prompts (recorded beside the adapters; serve, chat and generate use them)")
    h.add_argument(
        "--reasoning-effort",
        choices=("low", "medium", "high"),
        default="medium",
        help="of the rendered system message (default medium)",
    )
    h.add_argument(
        "--date",
        default="none",
        metavar="none|today|YYYY-MM-DD",
        help="conversation start date in the system message (default none: every run renders the same "
        "tokens whatever the day; today: the day the run starts)",
    )


def run_finetune(args, *, dtype: str, mesh) -> int:
    """`mesh` is built from --mesh by the caller, after `sharding.maybe_initialize_distributed()`."""
    from ..harmony import date_setting
    from ..lora import LoraConfig
    from .loop import TrainConfig, finetune

    try:
        date_setting(args.date)
    except ValueError as e:
        raise ValueError(f"--date {e}") from None
    lora = None if args.full else LoraConfig(rank=args.rank, alpha=args.alpha, targets=args.targets)
    train = TrainConfig(
        learning_rate=args.lr,
        schedule=args.schedule,
        warmup_steps=args.warmup,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        save_every=args.save_every,
        pack=not args.no_pack,
        assistant_only=not args.all_tokens,
        remat=not args.no_remat,
        full=args.full,
    )
    fmt = None if args.full or args.expert_format == "auto" else args.expert_format
    res = finetune(
        args.path,
        args.data,
        args.out,
        lora=lora,
        train=train,
        mesh=mesh,
        dtype=dtype,
        reasoning_effort=args.reasoning_effort,
        date=args.date,
        quiet=args.quiet,
        expert_format=fmt,
    )
    if not args.quiet:
        what = "adapters" if lora is not None else "checkpoint"
        print(f"{what} in {res.out} after {res.steps} steps; loss {res.losses[-1]:.4f}", file=sys.stderr)
    return 0


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the base checkpoint the adapters were trained on (any layout `load` reads, or a "
                   "Hugging Face model id)")  # fmt: skip
    p.add_argument("--adapters", metavar="DIR", required=True, help="LoRA adapters in PEFT's format (finetune's --out)")
    p.add_argument("--out", required=True, help="new folder: a Hugging Face layout checkpoint (safetensors)")
    p.add_argument("--experts", choices=("mxfp4", "dequantized"), default="mxfp4",
                   help="mxfp4 (default): re-quantized, the error reported and written to merge_report.json; "
                   "dequantized: dense experts (load them with --expert-format dequantized)")  # fmt: skip
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="of the written float tensors (default bfloat16, as released)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar; only errors")


def run_merge(args) -> int:
    from .merge import merge

    merge(args.base, args.adapters, args.out, experts=args.experts, dtype=args.dtype, quiet=args.quiet)
    return 0


def add_train_plan_arguments(p: argparse.ArgumentParser) -> None:
    """`gptoss-jax info MODEL --train`: options beside `info`'s own (model, --mesh, --batch, --dtype, ...)."""
    g = p.add_argument_group("training plan (with --train)")
    g.add_argument("--train", action="store_true", help="plan a fine-tuning step instead of inference")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    g.add_argument(
        "--targets", default="default", help="LoRA targets, as for finetune (default q,k,v,o,mlp1,mlp2)"
    )
    g.add_argument(
        "--full", action="store_true", help="full fine-tuning (experts dequantized) instead of LoRA"
    )
    g.add_argument("--no-remat", action="store_true", help="without rematerialization per layer")


def run_train_plan(args) -> int:
    """Prints the training plan; 0, or 2 with one line on stderr for bad input."""
    import json
    from pathlib import Path

    from ..hub import config_for
    from ..lora import LoraConfig
    from .memory import format_training_plan, plan_training

    try:
        model = args.model or args.model_opt
        if not model:
            raise ValueError(
                "no model: give a preset (gpt-oss-20b, gpt-oss-120b, tiny) or a checkpoint folder"
            )
        cfg = config_for(model).replace(dtype=args.dtype or "bfloat16")
        if args.expert_format and not args.full:
            cfg = cfg.replace(expert_format=args.expert_format)
        lora = None if args.full else LoraConfig(rank=args.rank, targets=args.targets)
        if args.device_memory is not None and not args.device_memory > 0:
            raise ValueError(f"--device-memory must be a positive number of GiB, got {args.device_memory}")
        p = plan_training(cfg, args.mesh, args.seq_len, args.batch, lora, remat=not args.no_remat)
    except (ValueError, OSError) as e:
        print(f"gptoss-jax info: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(p, indent=2))
    else:
        name = Path(model).name if Path(model).exists() else model
        print(format_training_plan(p, name=name, device_memory_gib=args.device_memory))
    return 0
