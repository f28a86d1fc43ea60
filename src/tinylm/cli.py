"""`tinylm <command>`: one subcommand per stage or tool; each is a thin wrapper over a function.

Mistakes a user can fix (UserError) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

from tinylm.errors import UserError
from tinylm.stages import RLHF, STAGES


def add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help=f"TOML file or preset name (default: {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--out", help="run dir to write (default: the config's `out`)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped")
    p.add_argument("--init", help="start from this run's weights and tokenizer")
    p.add_argument("--data", metavar="FILE", help="the training data (a corpus, a pairs TSV, "
                   "a chat JSONL: whatever the stage reads); the same as --set data.<key>=FILE")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 200, or what is left of the context window")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off, e.g. 1.2")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--truncate", action="store_true",
                   help="cut a prompt that is too long to its end instead of failing")
    p.add_argument("--seed", type=int, default=None)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """Where and how safely a server listens (tinylm serve, tinylm label)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require this bearer key on every route but /health (repeatable; "
                        "default: $TINYLM_API_KEY)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--dtype", default="auto", help="weights for generation (as in sample)")


def sampling_params(args: argparse.Namespace, prompt_len: int, block_size: int, **extra):
    """SamplingParams from add_sampling_args' flags; --max-new-tokens defaults to 200, or to
    what the context window leaves after the prompt."""
    from tinylm.infer.engine import SamplingParams

    n = args.max_new_tokens
    if n is None:
        n = max(1, min(200, block_size - prompt_len))
    return SamplingParams(max_new_tokens=n, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop=args.stop, truncate=args.truncate, seed=args.seed, **extra)


def print_result(result: dict) -> None:
    keys = ("step", "loss", "val_loss", "val_ppl", "train_time", "tokens", "tokens_per_s", "mfu",
            "objective/scores", "objective/kl", "eval/scores", "eval/gold", "eval/kl",
            "win_rate_vs_sft", "gold", "gold_sft", "proxy", "proxy_sft", "kl")  # last: rlhf
    parts = [f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}"
             for k in keys if k in result]
    print("done: " + " ".join(parts))
    if "val_acc" in result:
        print(f"held-out masked tokens: accuracy {result['val_acc']:.2%}, "
              f"perplexity {result['val_ppl']:.2f}")


# --- the training stages (pretrain, mlm, seq2seq, ...: tinylm.stages.STAGES) -----------------
def cmd_stage(stage, args: argparse.Namespace) -> None:
    from tinylm.stages.common import load_stage_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"{stage.data_key}={json.dumps(args.data)}")
    for flag, key, _ in stage.flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    cfg = load_stage_config(stage.config_cls, args.config, overrides, args.out, args.resume)
    if args.init:
        cfg.init = args.init
    print(f"{stage.doing} into {cfg.out}")
    print_result(stage.run(cfg, resume=args.resume))


# --- sample ---------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> None:
    import tinylm
    from tinylm.infer.engine import Engine
    from tinylm.infer.explain import explain_sample

    model, tok = tinylm.load(args.run, family="gpt")
    engine = Engine(model, tok, dtype=args.dtype)
    params = sampling_params(args, len(tok.encode(args.prompt)), model.config.block_size)
    if args.explain:
        completion, table = explain_sample(engine, args.prompt, params, args.explain)
        print(args.prompt + completion.text)
        print(table)
    elif args.num_samples == 1:  # stream: text appears as it is generated
        pieces = engine.stream(args.prompt, params)  # bad input fails here, before any output
        print(args.prompt, end="", flush=True)
        for delta in pieces:
            print(delta, end="", flush=True)
        print()
    else:
        seeds = [None if args.seed is None else args.seed + i for i in range(args.num_samples)]
        batch = [dataclasses.replace(params, seed=s) for s in seeds]
        for i, c in enumerate(engine.generate([args.prompt] * args.num_samples, batch)):
            print(f"--- sample {i + 1} ---")
            print(args.prompt + c.text)


# --- chat ---------------------------------------------------------------------------------
CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT, /temperature X, "
             "/explain (the last answer's token probabilities), /quit; Ctrl-C stops an answer")


def cmd_chat(args: argparse.Namespace) -> None:
    import tinylm
    from tinylm import rundir
    from tinylm.infer.chat import ChatSession
    from tinylm.infer.engine import Engine

    template = rundir.chat_template(Path(args.run), required=True)
    model, tok = tinylm.load(args.run, family="gpt")
    params = sampling_params(args, 0, model.config.block_size)
    session = ChatSession(Engine(model, tok, dtype=args.dtype), template, params, args.system)
    print(f"chatting with {args.run}; {CHAT_HELP}")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves)")
            continue
        try:
            if line.startswith("/"):
                if chat_command(session, line):
                    return
            elif line:
                chat_turn(session, line)
        except UserError as e:  # a bad command or message: say so, keep the conversation
            print(f"error: {e}")


def chat_command(session, line: str) -> bool:
    """Run a /command; True means leave."""
    from tinylm.infer.engine import SamplingParams

    name, _, arg = line.partition(" ")
    if name == "/quit":
        return True
    if name == "/reset":
        session.reset()
        print("(the conversation is forgotten)")
    elif name == "/system":
        session.system = arg.strip()
        print(f"(system message: {session.system!r})")
    elif name == "/temperature":
        try:
            t = float(arg)
        except ValueError:
            raise UserError(f"/temperature takes a number, e.g. /temperature 0.7; got "
                            f"{arg!r}") from None
        SamplingParams(temperature=t)  # checks the value
        session.params = dataclasses.replace(session.params, temperature=t)
        print(f"(temperature {t})")
    elif name == "/explain":
        print(session.explain())
    else:
        raise UserError(f"unknown command {name}; {CHAT_HELP}")
    return False


def chat_turn(session, line: str) -> None:
    stream = session.say(line)
    print("assistant> ", end="", flush=True)
    try:
        for delta in stream:
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        stream.close()
        print(" [stopped]", end="")
    print()
    session.answered(stream)


# --- serve ------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from tinylm.serve.app import DEFAULT_WORKERS, Limits, serve

    keys = args.api_key or ([os.environ["TINYLM_API_KEY"]]
                            if os.environ.get("TINYLM_API_KEY") else [])
    limits = Limits(max_n=args.max_n, max_tokens=args.max_tokens, max_batch=args.max_batch,
                    max_waiting=args.max_waiting, per_key_concurrency=args.per_key_concurrency)
    workers = DEFAULT_WORKERS if args.workers is None else args.workers
    serve(args.run, args.host, args.port, keys, args.insecure, limits, args.dtype, args.db,
          workers)


def cmd_label(args: argparse.Namespace) -> None:
    import os

    from tinylm.serve.label import serve_label

    keys = args.api_key or ([os.environ["TINYLM_API_KEY"]]
                            if os.environ.get("TINYLM_API_KEY") else [])
    serve_label(args.run, args.prompts, args.db, args.k, args.host, args.port, keys,
                args.insecure, args.dtype, args.max_new_tokens, args.temperature)


# --- data make-chat, eval-chat ----------------------------------------------------------
def cmd_make_chat(args: argparse.Namespace) -> None:
    from tinylm.data.make_chat import make_chat

    counts = make_chat(args.out)
    print(f"wrote {args.out}/chat-train.jsonl and chat-heldout.jsonl: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))


def cmd_eval_chat(args: argparse.Namespace) -> None:
    import tinylm
    from tinylm import rundir
    from tinylm.data.chat import read_conversations
    from tinylm.eval.chat import chat_metrics
    from tinylm.infer.engine import Engine

    template = None if args.plain else rundir.chat_template(Path(args.run), required=True)
    model, tok = tinylm.load(args.run, family="gpt")
    read_conversations(args.data)  # the file's own checks, with line numbers
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line]
    m = chat_metrics(Engine(model, tok, dtype=args.dtype), rows, template)
    for s in m.pop("samples", []):
        print(f"[{'ok' if s['ok'] else '--'}] {s['request']}\n     {s['answer']!r}")
    print(json.dumps(m))


# --- next-word ------------------------------------------------------------------------------
def cmd_next_word(args: argparse.Namespace) -> None:
    import tinylm
    from tinylm import viz
    from tinylm.infer.explain import format_table, next_token_table

    model, tok = tinylm.load(args.run, family="gpt")
    rows = next_token_table(model, tok, args.text, args.k)
    print(f"next token after {args.text!r}:")
    print(format_table(rows))
    if args.png:
        print(f"wrote {viz.plot_next_tokens(args.text, rows, Path(args.png))}")


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


# --- translate ------------------------------------------------------------------------------
def cmd_translate(args: argparse.Namespace) -> None:
    from tinylm.infer.beam import translate
    from tinylm.rundir import load_seq2seq

    model, src_tok, tgt_tok = load_seq2seq(args.run)
    for text in args.text:
        print(translate(model, src_tok, tgt_tok, [text], args.beam, args.length_penalty,
                        args.max_len)[0])


# --- experiment -----------------------------------------------------------------------------
def cmd_experiment(args: argparse.Namespace) -> None:
    from tinylm.stages.common import load_stage_config

    if args.name == "bottleneck":
        from tinylm.experiments.bottleneck import BottleneckConfig, run_bottleneck

        cfg = load_stage_config(BottleneckConfig, args.config or "seq2seq-bottleneck",
                                args.overrides, args.out, False)
        run_bottleneck(cfg)
    else:
        from tinylm.experiments.translation import TranslationTableConfig, run_translation_table

        cfg = load_stage_config(TranslationTableConfig, args.config, args.overrides, args.out,
                                False)
        run_translation_table(cfg)


# --- basics ---------------------------------------------------------------------------------
def cmd_basics(args: argparse.Namespace) -> None:
    from tinylm.experiments.basics import run_basics

    run_basics(args.name, Path(args.out), args.seed, args.trace)


# --- attention ------------------------------------------------------------------------------
def cmd_attention(args: argparse.Namespace) -> None:
    from tinylm.infer.attention import attention_maps, plot_attention

    maps = attention_maps(args.run, args.text, args.beam)
    L, H, T, S = maps.weights.shape
    if maps.kind == "cross":
        print(f"translation: {maps.translation}")
    print(f"{maps.family} {maps.kind}-attention: {L} layer(s) x {H} head(s), "
          f"{T} x {S} tokens")
    print(f"wrote {plot_attention(maps, Path(args.png))}")


# --- export-hf ------------------------------------------------------------------------------
def cmd_export_hf(args: argparse.Namespace) -> None:
    from tinylm.hf import export_hf

    out = export_hf(args.run, args.out_dir)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained"
          f"({str(out)!r}) and AutoTokenizer")


# --- import-hf ------------------------------------------------------------------------------
def cmd_import_hf(args: argparse.Namespace) -> None:
    from tinylm.hf import import_checkpoint, import_hf

    if Path(args.hf_dir).suffix == ".gguf":  # a llama.cpp file (tinylm.gguf, docs/hf.md)
        from tinylm.gguf import read_gguf

        cfg, tensors, tokenizer, template = read_gguf(args.hf_dir)
        notes = import_checkpoint(cfg, tensors, tokenizer, template, Path(args.run),
                                  str(Path(args.hf_dir).resolve()),
                                  {"config.json": json.dumps(cfg, indent=2)})
    else:
        notes = import_hf(args.hf_dir, args.run)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote run dir {args.run}: try `tinylm sample --run {args.run} --prompt ...`")


# --- feedback collect | export | import, eval winrate (RLHF, docs/rlhf.md) ---------------------
def cmd_feedback(args: argparse.Namespace) -> None:
    from tinylm.feedback import io
    from tinylm.feedback.store import Store

    if args.what == "collect":
        from tinylm.feedback.collect import CollectConfig, collect

        if not (args.run and args.prompts):
            raise UserError("feedback collect needs --run RUN and --prompts FILE")
        cfg = CollectConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed, round=args.round, reward_model=args.reward_model,
                            dtype=args.dtype)
        counts = collect(args.run, args.prompts, args.k, args.labeler, args.db, args.limit, cfg)
        print(f"stored in {args.db}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        agreement = Store(args.db).agreement()
        if agreement["comparisons"]:
            print(f"labeler agreement: {agreement['agreement']:.2%} of {agreement['pairs']} "
                  f"pairs over {agreement['comparisons']} comparisons")
    elif args.what == "export":
        if not args.out:
            raise UserError("feedback export needs --out FILE")
        n = io.export(Store(args.db), args.out, args.format, args.labeler_filter)
        print(f"wrote {n} {args.format} lines to {args.out}")
    else:
        if not args.file:
            raise UserError("feedback import needs --file FILE (rankings or pairs JSONL)")
        print(f"imported {io.import_file(Store(args.db), args.file)} rankings into {args.db}")


def cmd_eval_winrate(args: argparse.Namespace) -> None:
    from tinylm.eval.winrate import winrate

    result = winrate(args.a, args.b, args.judge, args.prompts, limit=args.limit,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     seed=args.seed, ref=args.ref, kl_samples=args.kl_samples, also=args.also,
                     samples=args.samples)
    print(json.dumps(result))


def add_feedback_parsers(sub) -> None:
    p = sub.add_parser("feedback", help="collect, export and import rankings (RLHF)")
    p.add_argument("what", choices=["collect", "export", "import"],
                   help="collect: sample K answers per prompt and rank them with a guideline "
                        "labeler; export: write rankings or TRL pairs JSONL; import: read one")
    p.add_argument("--db", default="runs/feedback.db",
                   help="SQLite file or SQLAlchemy URL (default: runs/feedback.db)")
    p.add_argument("--run", help="collect: the chat run that answers")
    p.add_argument("--prompts", help="collect: JSONL of prompts (make-chat rows, or "
                   '{"messages": ...} / {"prompt": ...} lines)')
    p.add_argument("--k", type=int, default=4, help="collect: answers per prompt (default 4)")
    p.add_argument("--labeler", default="request", help="collect: request | sentiment")
    p.add_argument("--limit", type=int, default=0, help="collect: first N prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round", type=int, default=0, help="collect: the round to record")
    p.add_argument("--reward-model", default="", help="collect: this round's reward model run")
    p.add_argument("--dtype", default="auto", help="weights for generation (as in sample)")
    p.add_argument("--out", help="export: file to write")
    p.add_argument("--format", default="rankings", choices=["rankings", "pairs"],
                   help="export: K-wise rankings (tinylm reward/dpo) or TRL pairs")
    p.add_argument("--only", dest="labeler_filter", default=None, metavar="LABELER",
                   help="export: rankings of this labeler only")
    p.add_argument("--file", help="import: rankings or pairs JSONL")
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("eval", help="compare two runs (winrate)")
    p.add_argument("what", choices=["winrate"], help="winrate: A vs B judged on prompts")
    p.add_argument("--a", required=True, help="run A")
    p.add_argument("--b", required=True, help="run B")
    p.add_argument("--judge", default="request",
                   help="request | sentiment | textblob | reward:RUN (default request)")
    p.add_argument("--prompts", default="runs/chat/chat-heldout.jsonl")
    p.add_argument("--limit", type=int, default=0, help="first N prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--samples", type=int, default=1, help="answers per prompt per side, "
                   "sample j of A against sample j of B (> 1 needs --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref", default=None, help="the reference for A's mean KL (default: the "
                   "SFT run A was trained from by PPO/DPO, else B)")
    p.add_argument("--kl-samples", type=int, default=2,
                   help="answers of A sampled per prompt for the KL (0 = skip)")
    p.add_argument("--also", action="append", default=[], metavar="JUDGE",
                   help="score both sides by this judge too, e.g. reward:RUN (repeatable)")
    p.set_defaults(func=cmd_eval_winrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for stage in [*STAGES.values(), RLHF]:
        p = sub.add_parser(stage.name, help=stage.help)
        add_config_args(p, stage.preset)
        for flag, _, text in stage.flags:
            p.add_argument(flag, help=text, type=int if flag in stage.int_flags else None)
        p.set_defaults(func=functools.partial(cmd_stage, stage))

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("--run", required=True, help="run dir")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--num-samples", type=int, default=1)
    add_sampling_args(p)
    p.add_argument("--dtype", default="auto",
                   help="weights for generation: auto (the fastest measured on this CPU: fp32, "
                        "int8, or bf16 where native; bf16 on a GPU), fp32, bf16 or int8 "
                        "(default: auto)")
    p.add_argument("--explain", type=int, nargs="?", const=5, default=0, metavar="K",
                   help="show each token's probability and its K runners-up (default 5)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("chat", help="talk with a chat model (after tinylm sft, or imported)")
    p.add_argument("--run", required=True, help="run dir with a chat template")
    p.add_argument("--system", default="", help="system message")
    add_sampling_args(p)
    p.add_argument("--dtype", default="auto", help="weights for generation (as in sample)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible API, chat page (/), autocomplete "
                                     "page (/complete) and ranking page (/label) for a run")
    p.add_argument("--run", required=True, help="run dir")
    p.add_argument("--db", default=None, help="feedback store for /label: a SQLite file or "
                   "SQLAlchemy URL (default: feedback.db beside the run dir)")
    add_server_args(p)
    p.add_argument("--max-batch", type=int, default=64, help="rows decoding together")
    p.add_argument("--max-waiting", type=int, default=256, help="rows queued; more get 503")
    p.add_argument("--max-n", type=int, default=16, help="choices per prompt")
    p.add_argument("--max-tokens", type=int, default=4096, help="cap on max_tokens")
    p.add_argument("--per-key-concurrency", type=int, default=64,
                   help="requests in flight per key (per address without keys); more get 429")
    p.add_argument("--workers", type=int, choices=(0, 1), default=None,
                   help="1: decode in a process of its own, beside the server's event loop "
                        "(it gains where a core is idle); 0: in a thread of the server's "
                        "process (default: serve.app.DEFAULT_WORKERS)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("label", help="the ranking page (/label) for people: K answers per "
                                     "prompt of a file, sampled from a run (RLHF)")
    p.add_argument("--run", required=True, help="the chat run whose answers are ranked")
    p.add_argument("--prompts", required=True, help="JSONL of prompts (messages or prompt)")
    p.add_argument("--db", default="runs/feedback.db",
                   help="feedback store: SQLite path or SQLAlchemy URL")
    p.add_argument("--k", type=int, default=4, help="answers per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap")
    p.add_argument("--temperature", type=float, default=1.0)
    add_server_args(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("data", help="make data sets from the shipped corpora")
    p.add_argument("what", choices=["make-chat"], help="make-chat: dialogues for tinylm sft")
    p.add_argument("--out", default="runs/chat", help="folder to write (default: runs/chat)")
    p.set_defaults(func=cmd_make_chat)

    p = sub.add_parser("eval-chat", help="request-following rate, chrF and more on held-out "
                                         "chat requests")
    p.add_argument("--run", required=True, help="run dir")
    p.add_argument("--data", default="runs/chat/chat-heldout.jsonl",
                   help="held-out conversations (tinylm data make-chat)")
    p.add_argument("--plain", action="store_true",
                   help="ask as plain text, no chat template (a pre-trained run)")
    p.add_argument("--dtype", default="auto", help="weights for generation (as in sample)")
    p.set_defaults(func=cmd_eval_chat)

    p = sub.add_parser("export-hf", help="write a run as a Hugging Face transformers folder")
    p.add_argument("run", help="run dir of a GPT")
    p.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer)")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="turn a local transformers GPT-2/Llama/Qwen2/Qwen3 "
                                         "folder, or a llama.cpp .gguf file, into a run dir")
    p.add_argument("hf_dir", help="folder with config.json, model.safetensors, tokenizer.json; "
                                  "or a Llama/Qwen FILE.gguf")
    p.add_argument("run", help="run dir to write")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("next-word", help="table of the most likely next tokens")
    p.add_argument("--run", required=True, help="run dir")
    p.add_argument("text", help="the text so far")
    p.add_argument("-k", type=int, default=10, help="how many candidates")
    p.add_argument("--png", help="also draw a bar chart into this PNG file")
    p.set_defaults(func=cmd_next_word)

    p = sub.add_parser("fill-mask", help="top candidates for each [MASK] in a sentence")
    p.add_argument("--run", required=True, help="run dir of a masked LM (tinylm mlm)")
    p.add_argument("text", help='a sentence with one or more [MASK], e.g. "The [MASK] is red."')
    p.add_argument("-k", type=int, default=5, help="candidates per [MASK]")
    p.set_defaults(func=cmd_fill_mask)

    p = sub.add_parser("translate", help="translate sentences with a seq2seq run")
    p.add_argument("--run", required=True, help="run dir of `tinylm seq2seq`")
    p.add_argument("text", nargs="+", help='sentence(s) to translate, e.g. "I am cold."')
    p.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="GNMT alpha; 0 = raw log-probability")
    p.add_argument("--max-len", type=int, default=0, help="longest output; 0 = block_size")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("experiment", help="side-by-side experiments (bottleneck, translation)")
    p.add_argument("name", choices=["bottleneck", "translation"],
                   help="bottleneck: accuracy vs input length of three encoder-decoders; "
                        "translation: BLEU/chrF table of the three seq2seq presets")
    p.add_argument("--config", default=None, help="TOML file or preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--out", help="folder for the experiment's runs and results")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("basics", help="neural-network basics in seconds: cats-dogs, cake, "
                                      "spirals (docs/basics.md)")
    p.add_argument("name", choices=["cats-dogs", "cake", "spirals"],
                   help="cats-dogs: a rule vs a model learnt from examples; cake: "
                        "backpropagation step by step; spirals: shallow vs deep")
    p.add_argument("--trace", action="store_true",
                   help="also print one example's forward values and gradients, layer by layer")
    p.add_argument("--out", default="runs/basics", help="folder for the pictures "
                                                        "(default: runs/basics)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    p.set_defaults(func=cmd_basics)

    p = sub.add_parser("attention", help="draw attention maps of a run for a text")
    p.add_argument("--run", required=True, help="run dir (gpt, bert, transformer or rnn)")
    p.add_argument("text", help="prompt (gpt, bert) or sentence to translate (seq2seq)")
    p.add_argument("--png", required=True, help="PNG file to write")
    p.add_argument("--beam", type=int, default=1, help="beam size for translations")
    p.set_defaults(func=cmd_attention)
    add_feedback_parsers(sub)
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
