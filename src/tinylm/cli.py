"""`tinylm <command>`: one subcommand per stage or tool; each is a thin wrapper over a function.

Mistakes a user can fix (UserError) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinylm.errors import UserError


def add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help=f"TOML file or preset name (default: {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--out", help="run dir to write (default: the config's `out`)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped")
    p.add_argument("--init", help="start from this run's weights and tokenizer")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)


def print_result(result: dict) -> None:
    keys = ("step", "loss", "val_loss", "val_ppl", "train_time", "tokens", "tokens_per_s", "mfu")
    parts = [f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}"
             for k in keys if k in result]
    print("done: " + " ".join(parts))


# --- pretrain -------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> None:
    from tinylm.stages.common import load_stage_config
    from tinylm.stages.pretrain import PretrainConfig, pretrain

    cfg = load_stage_config(PretrainConfig, args.config, args.overrides, args.out, args.resume)
    if args.init:
        cfg.init = args.init
    print(f"pretraining into {cfg.out}")
    print_result(pretrain(cfg, resume=args.resume))


# --- sample ---------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    import tinylm
    from tinylm.infer.engine import SamplingParams, naive_generate

    model, tok = tinylm.load(args.run)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.seed)
    ids = tok.encode(args.prompt) or [tok.bos_id]
    out = naive_generate(model, torch.tensor([ids] * args.num_samples), params)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tok.decode(row, skip_special=True))


# --- next-word ------------------------------------------------------------------------------
def cmd_next_word(args: argparse.Namespace) -> None:
    import tinylm
    from tinylm import viz
    from tinylm.infer.explain import format_table, next_token_table

    model, tok = tinylm.load(args.run)
    rows = next_token_table(model, tok, args.text, args.k)
    print(f"next token after {args.text!r}:")
    print(format_table(rows))
    if args.png:
        print(f"wrote {viz.plot_next_tokens(args.text, rows, Path(args.png))}")


# --- mlm ------------------------------------------------------------------------------------
def cmd_mlm(args: argparse.Namespace) -> None:
    from tinylm.stages.common import load_stage_config
    from tinylm.stages.mlm import MLMConfig, train_mlm

    cfg = load_stage_config(MLMConfig, args.config, args.overrides, args.out, args.resume)
    if args.init:
        cfg.init = args.init
    print(f"training a masked LM into {cfg.out}")
    result = train_mlm(cfg, resume=args.resume)
    print_result(result)
    if "val_acc" in result:
        print(f"held-out masked tokens: accuracy {result['val_acc']:.2%}, "
              f"perplexity {result['val_ppl']:.2f}")


# --- fill-mask ------------------------------------------------------------------------------
def cmd_fill_mask(args: argparse.Namespace) -> None:
    from tinylm.infer.explain import format_table
    from tinylm.infer.fill_mask import best_fill, fill_mask, load_masked_lm

    model, tok = load_masked_lm(args.run)
    blanks = fill_mask(model, tok, args.text, args.k)
    for n, blank in enumerate(blanks, 1):
        print(f"[MASK] {n} of {len(blanks)}:")
        print(format_table(blank.candidates))
    print(f"best: {best_fill(tok, args.text, blanks)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pre-train a GPT on raw text")
    add_config_args(p, "shakespeare-char")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("--run", required=True, help="run dir")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--num-samples", type=int, default=1)
    add_sampling_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("next-word", help="table of the most likely next tokens")
    p.add_argument("--run", required=True, help="run dir")
    p.add_argument("text", help="the text so far")
    p.add_argument("-k", type=int, default=10, help="how many candidates")
    p.add_argument("--png", help="also draw a bar chart into this PNG file")
    p.set_defaults(func=cmd_next_word)

    p = sub.add_parser("mlm", help="train a masked language model (BERT)")
    add_config_args(p, "mlm-tinystories")
    p.set_defaults(func=cmd_mlm)

    p = sub.add_parser("fill-mask", help="top candidates for each [MASK] in a sentence")
    p.add_argument("--run", required=True, help="run dir of a masked LM (tinylm mlm)")
    p.add_argument("text", help='a sentence with one or more [MASK], e.g. "The [MASK] is red."')
    p.add_argument("-k", type=int, default=5, help="candidates per [MASK]")
    p.set_defaults(func=cmd_fill_mask)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
