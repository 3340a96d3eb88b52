"""The `deltaray` command.

    deltaray model init --preset {tiny,demo} --out DIR [--seed N] [--dtype D]
    deltaray model inspect DIR|PRESET
    deltaray model plan --model DIR|PRESET --gpus N --max-model-len L [--gpu-memory 141GB] [--dtype bf16|fp8] [--ep N]
    deltaray demo [--model DIR|preset:NAME]

User errors print one line naming the problem and exit with status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def cmd_model_init(args) -> None:
    from model.random_checkpoint import write_random_checkpoint
    if args.preset not in ("tiny", "demo"):
        raise ValueError(f"--preset: random checkpoints are written for 'tiny' and 'demo' only, "
                         f"not {args.preset!r} (the real sizes are configs for planning)")
    out = write_random_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype)
    print(f"wrote {args.preset} checkpoint to {out}")


def cmd_model_inspect(args) -> None:
    from model.config import ModelConfig
    from model.footprint import layer_pattern, parameter_counts
    import torch
    target = Path(args.model)
    cfg = ModelConfig.from_pretrained(target) if target.exists() else ModelConfig.preset(args.model)
    counts = parameter_counts(cfg)
    print(f"model_type        {cfg.model_type}")
    print(f"layers            {cfg.num_hidden_layers}: {cfg.num_linear_attention_layers} Gated "
          f"DeltaNet + {cfg.num_full_attention_layers} full attention")
    print(f"layer pattern     {layer_pattern(cfg)}   (L = Gated DeltaNet, F = full attention)")
    ffn = (f"MoE {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}" if cfg.is_moe
           else f"dense MLP {cfg.intermediate_size}")
    print(f"feed-forward      {ffn}")
    print(f"vocabulary        {cfg.vocab_size}")
    print(f"parameters        {_count(counts.total)} total, {_count(counts.routed_experts)} routed "
          f"experts, {_count(counts.active_per_token)} active per token")
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                        ("fp8", torch.float8_e4m3fn)):
        print(f"weights {name:<9} {counts.bytes(dtype) / 2**30:,.2f} GiB")


def cmd_demo(args) -> None:
    from cluster.demo import run_demo
    run_demo(args.model)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="write, inspect and plan checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser("init", help="write a random-weight HF-format checkpoint")
    init.add_argument("--preset", required=True)
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    init.set_defaults(func=cmd_model_init)
    inspect = model_sub.add_parser("inspect", help="layer pattern, parameter counts, bytes")
    inspect.add_argument("model", help="checkpoint directory or preset name")
    inspect.set_defaults(func=cmd_model_inspect)
    from model.plan import add_plan_parser
    add_plan_parser(model_sub)
    demo = sub.add_parser("demo", help="generate a few completions with the demo checkpoint")
    demo.add_argument("--model", default="preset:demo")
    demo.set_defaults(func=cmd_demo)
    from pipelines.cli import add_batch_commands
    add_batch_commands(sub)
    from cluster.k8s_render import add_k8s_commands
    add_k8s_commands(sub)
    from cluster.serve_cli import add_serve_commands
    add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"deltaray: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
