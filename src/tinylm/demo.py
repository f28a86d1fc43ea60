"""`make demo`: pre-train the default GPT on the shipped TinyStories text (about 3 minutes on
2 CPU cores), then show what it learned: samples, and the next-word table for a sentence."""

from __future__ import annotations

import sys
from pathlib import Path

import tinylm
from tinylm import config as configlib
from tinylm import viz
from tinylm.errors import UserError
from tinylm.infer.engine import Engine, SamplingParams
from tinylm.infer.explain import format_table, next_token_table
from tinylm.stages import pretrain
from tinylm.stages.pretrain import PretrainConfig

RUN = Path("runs/demo-tinystories")
SENTENCE = "The sun is shining and the birds are"


def main() -> int:
    try:
        if (RUN / "model.safetensors").is_file():
            print(f"== using the model already trained in {RUN} (delete it to retrain)")
        else:
            print("== 1. pre-training a GPT on TinyStories (tinylm pretrain --config "
                  f"tinystories-bpe --out {RUN}); about 3 minutes")
            cfg = configlib.load(PretrainConfig, "tinystories-bpe", [f"out='{RUN}'"])
            result = pretrain.run(cfg)
            print(f"   validation loss {result['val_loss']:.3f} (perplexity "
                  f"{result['val_ppl']:.1f}) after {result['step']} steps, "
                  f"{result['train_time']:.0f} s; loss curve in {RUN}/loss.png")
        model, tok = tinylm.load(RUN)
        print(f"\n== 2. samples (tinylm sample --run {RUN} --prompt 'Once upon a time')")
        params = [SamplingParams(max_new_tokens=60, temperature=0.8, top_k=50, seed=s)
                  for s in range(3)]
        for out in Engine(model, tok, dtype="auto").generate(["Once upon a time"] * 3, params):
            print("   Once upon a time" + out.text.replace("\n", " "), "\n")
        print(f"== 3. next word (tinylm next-word --run {RUN} '{SENTENCE}')")
        rows = next_token_table(model, tok, SENTENCE, 10)
        print(format_table(rows))
        png = viz.plot_next_tokens(SENTENCE, rows, RUN / "next-word.png")
        print(f"\n(bar chart: {png})")
    except UserError as e:
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
