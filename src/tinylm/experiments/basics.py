"""The basics, before language: learning from examples, neurons and weights, backpropagation
you can watch, shallow against deep. Each demo runs in seconds on a laptop CPU.

    tinylm basics cats-dogs   # a hand-written rule against a model learnt from examples
    tinylm basics cake        # backpropagation as "adjust the recipe a little", step by step
    tinylm basics spirals     # a shallow and a deep network of the same size, several seeds
    tinylm basics spirals --trace   # plus one example's forward values and gradients

Every demo is a function (`cats_dogs`, `cake`, `spirals`) that returns its tables and numbers
and writes its pictures into `out`; `trace` is the layer-by-layer forward and backward pass
worked by hand. All data are generated here from a seed, so a run is repeatable.

The cats-dogs and spirals networks train through the project's one training loop
(`train.loop.train`, AdamW, cosine schedule). The cake does not, on purpose: its lesson is the
rule "each weight moves by minus the learning rate times its gradient", which is plain
gradient descent on one cake at a time, and AdamW's moves (scaled by running averages) would
hide it. So `sgd_step` writes that one line out, and the cake prints what it did.
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm.errors import UserError
from tinylm.files import atomic_write_bytes
from tinylm.models.mlp import MLP, MLPConfig, shallow_twin
from tinylm.stages.common import batch_generator
from tinylm.train.loop import TrainConfig, train

DEMOS = ("cats-dogs", "cake", "spirals")
Say = Callable[..., None]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110) -> Path:
    """A figure into a PNG, written atomically like every tinylm file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)  # whole titles
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _folder(out: Path | str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# --- training through the one loop ----------------------------------------------------------
def classify(model: MLP, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The objective for the loop: batch = (inputs, labels); throughput counts examples."""
    x, y = batch
    return model(x, y), len(y)


def fit(model: MLP, x: torch.Tensor, y: torch.Tensor, run_dir: Path, *, steps: int,
        lr: float, seed: int, batch_size: int = 128, eval_fn=None, eval_every: int = 0
        ) -> dict[str, Any]:
    """Train `model` on (x, y) with `train.loop.train`: AdamW, short warm-up, cosine decay,
    random mini-batches drawn from (seed, step). One thread on the CPU: at this size a second
    one only waits."""
    cfg = TrainConfig(steps=steps, batch_size=batch_size, optimizer="adamw", lr=lr,
                      warmup_steps=min(20, steps // 10), schedule="cosine", grad_clip=0.0,
                      dtype="float32", device="cpu", threads=1, log_every=max(1, steps // 10),
                      eval_every=eval_every, keep_states=1, seed=seed, progress=False)
    n = len(x)
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # a rerun overwrites: a demo of seconds

    def batch_fn(step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size >= n:
            return x, y
        idx = torch.randint(n, (batch_size,), generator=batch_generator(seed, step, k))
        return x[idx], y[idx]  # (B, d_in), (B,)

    with contextlib.redirect_stdout(io.StringIO()):  # the loop's per-eval lines: not here
        return train(model, classify, batch_fn, cfg, run_dir, eval_fn=eval_fn)


@torch.no_grad()
def accuracy(model: MLP, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model.predict(x) == y).float().mean().item()


# --- 1. learning from examples: cats and dogs -----------------------------------------------
FEATURES = ("whisker length (cm)", "ear pointiness (0-1)", "leg length (cm)", "weight (kg)")
ANIMALS = ("cat", "dog")


def make_animals(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n animals, about half dogs: features (n, 4) as in FEATURES, labels (n,) 0 cat / 1 dog.
    Made up, with overlap: small dogs weigh what cats weigh, some dogs have pointy ears."""
    dog = torch.rand(n, generator=gen) < 0.5  # (n,)

    def normal(mean_cat: float, sd_cat: float, mean_dog: float, sd_dog: float):
        r = torch.randn(n, generator=gen)
        return torch.where(dog, mean_dog + sd_dog * r, mean_cat + sd_cat * r)

    whiskers = normal(7.0, 1.0, 5.5, 1.3).clamp(min=1.0)
    ears = normal(0.85, 0.1, 0.5, 0.25).clamp(0.0, 1.0)
    legs = normal(14.0, 2.5, 27.0, 9.0).clamp(min=6.0)
    log_kg = normal(math.log(4.5), 0.25, math.log(12.0), 0.7)  # weights spread by a factor
    x = torch.stack([whiskers, ears, legs, log_kg.exp()], dim=1)  # (n, 4)
    return x, dog.long()


def hand_rule(x: torch.Tensor) -> torch.Tensor:
    """What someone might write down without data: heavier than 7 kg or floppy ears: dog."""
    return ((x[:, 3] > 7.0) | (x[:, 1] < 0.6)).long()


def cats_dogs(out: Path, seed: int = 0, n_train: int = 300, n_test: int = 1000,
              steps: int = 300, say: Say = print) -> dict[str, Any]:
    """The rule against one neuron (logistic regression) that learnt its weights from
    n_train labelled animals; both judged on n_test animals neither has seen."""
    out = _folder(out)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = make_animals(n_train, gen)
    x_test, y_test = make_animals(n_test, gen)
    mean, std = x_train.mean(0), x_train.std(0)  # scale features so their weights compare
    torch.manual_seed(seed)
    model = MLP(MLPConfig(d_in=4, n_out=1, n_layer=0))  # one neuron: w . x + b, sigmoid
    t0 = time.perf_counter()
    fit(model, (x_train - mean) / std, y_train, out / "cats-dogs-run", steps=steps, lr=0.05,
        seed=seed, batch_size=n_train)
    model.eval()
    rule_acc = (hand_rule(x_test) == y_test).float().mean().item()
    learnt_acc = accuracy(model, (x_test - mean) / std, y_test)
    weights = model.head.weight[0].tolist()
    result = {"rule_accuracy": rule_acc, "learnt_accuracy": learnt_acc,
              "learnt_train_accuracy": accuracy(model, (x_train - mean) / std, y_train),
              "weights": dict(zip(FEATURES, weights)), "bias": model.head.bias.item(),
              "train_seconds": time.perf_counter() - t0, "model": model,
              "scale": (mean, std), "test": (x_test, y_test)}
    result["table"] = _cats_dogs_table(x_train, y_train, result)
    say(result["table"])
    result["png"] = plot_cats_dogs(x_test, y_test, result, out / "basics-cats-dogs.png")
    say(f"wrote {result['png']}")
    return result


def _cats_dogs_table(x: torch.Tensor, y: torch.Tensor, r: dict[str, Any]) -> str:
    head = "  ".join(f"{f:>20}" for f in FEATURES)
    lines = ["Some of the labelled animals the model learns from:", f"{head}  animal"]
    lines += ["  ".join(f"{v:>20.2f}" for v in row) + f"  {ANIMALS[int(lab)]}"
              for row, lab in zip(x[:5].tolist(), y[:5])]
    lines += ["", "Held-out animals correctly named:",
              f"  hand rule (heavier than 7 kg or floppy ears -> dog)  {r['rule_accuracy']:.1%}",
              f"  learnt from {len(y)} examples (one neuron)           "
              f"{r['learnt_accuracy']:.1%}", "",
              "What the neuron learnt (features scaled to mean 0, spread 1; + pulls to dog):"]
    for name, w in r["weights"].items():
        lines.append(f"  {name:<22} weight {w:+6.2f}   {'dog' if w > 0 else 'cat'}-ward")
    lines.append(f"  {'bias':<22}        {r['bias']:+6.2f}")
    return "\n".join(lines)


def plot_cats_dogs(x: torch.Tensor, y: torch.Tensor, r: dict[str, Any], path: Path) -> Path:
    """Left: held-out animals by weight and ear shape, with the hand rule's lines. Right: the
    learnt weight of each feature."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for label, colour in ((0, "#dd8452"), (1, "#4c72b0")):
        m = y == label
        ax.scatter(x[m, 3].numpy(), x[m, 1].numpy(), s=8, alpha=0.5, c=colour, label=ANIMALS[label])
    ax.axvline(7.0, color="k", lw=1, ls="--", label="hand rule: 7 kg")
    ax.axhline(0.6, color="k", lw=1, ls=":", label="hand rule: ears 0.6")
    ax.set_xscale("log")
    ax.set_xlabel("weight (kg)")
    ax.set_ylabel("ear pointiness")
    ax.set_title(f"held-out animals; rule {r['rule_accuracy']:.0%}, "
                 f"learnt {r['learnt_accuracy']:.0%}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    names = [f.split(" (")[0] for f in r["weights"]]
    ws = list(r["weights"].values())
    bx.barh(names[::-1], ws[::-1], color=["#4c72b0" if w > 0 else "#dd8452" for w in ws[::-1]])
    bx.axvline(0, color="k", lw=0.8)
    bx.set_xlabel("learnt weight (per spread of the feature; + = dog)")
    bx.set_title("what the neuron weighs", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- 2. the cake: backpropagation step by step ----------------------------------------------
RECIPE = (("sugar", "g", 50.0, 250.0), ("mixing", "min", 1.0, 15.0),
          ("oven", "°C", 150.0, 230.0))  # name, unit, lowest, highest setting


def cake_quality(settings: torch.Tensor) -> torch.Tensor:
    """The made-up taste (0-10) of cakes (n, 3) in real units: best near 150 g of sugar,
    6 minutes of mixing and 180 °C, falling off smoothly around that."""
    best = torch.tensor([150.0, 6.0, 180.0])
    width = torch.tensor([70.0, 5.0, 25.0])
    return 10 * torch.exp(-0.5 * (((settings - best) / width) ** 2).sum(-1))  # (n,)


def random_cakes(n: int, gen: torch.Generator) -> torch.Tensor:
    lo = torch.tensor([r[2] for r in RECIPE])
    hi = torch.tensor([r[3] for r in RECIPE])
    return lo + (hi - lo) * torch.rand(n, 3, generator=gen)  # (n, 3) real units


def recipe_scale(settings: torch.Tensor) -> torch.Tensor:
    """Settings in real units -> -1..1, so no input dominates just by its unit."""
    lo = torch.tensor([r[2] for r in RECIPE])
    hi = torch.tensor([r[3] for r in RECIPE])
    return 2 * (settings - lo) / (hi - lo) - 1


def weight_names(model: MLP, inputs: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """A readable name for every number of every parameter, in the order of
    `param.flatten()` (a Linear's weight is (out, in)): 'sugar -> h1', 'bias of h1'."""
    layers = [*model.hidden, model.head]
    below = list(inputs) or [f"x{j + 1}" for j in range(model.config.d_in)]
    names: dict[str, list[str]] = {}
    for i, layer in enumerate(layers):
        n = layer.out_features
        if layer is model.head:
            prefix, here = "head", ["out"] if n == 1 else [f"out{j + 1}" for j in range(n)]
        else:
            prefix = f"hidden.{i}"
            tag = "h" if len(model.hidden) == 1 else f"h{i + 1}."
            here = [f"{tag}{j + 1}" for j in range(n)]
        names[f"{prefix}.weight"] = [f"{b} -> {h}" for h in here for b in below]
        names[f"{prefix}.bias"] = [f"bias of {h}" for h in here]
        below = here
    return names


def sgd_step(model: MLP, lr: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Plain gradient descent: every weight moves by -lr * its gradient (which backward()
    left in .grad). Returns {parameter name: (gradient, move)}."""
    done = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            move = -lr * p.grad  # the whole of "adjust the recipe a little"
            done[name] = (p.grad.clone(), move)
            p += move
            p.grad = None
    return done


@dataclass
class CakeStep:
    step: int
    settings: list[float]  # the cake baked this step, real units
    predicted: float
    tasted: float
    loss: float  # (predicted - tasted)^2
    grads: dict[str, list[float]]  # parameter name -> each number's d loss / d it
    moves: dict[str, list[float]]  # parameter name -> each number's move, -lr * gradient
    test_error: float  # mean |predicted - tasted| over the held-out cakes, after the step


def cake(out: Path, seed: int = 0, steps: int = 400, lr: float = 0.05, hidden: int = 3,
         shown: int = 6, every: int = 50, say: Say = print) -> dict[str, Any]:
    """A 3 -> hidden (tanh) -> 1 network learns to predict a cake's taste from its recipe,
    one cake per step. Prints the first `shown` steps in full (prediction, error, every
    weight's gradient and move), then one line every `every` steps, then each weight's
    total move."""
    out = _folder(out)
    gen = torch.Generator().manual_seed(seed)
    test = random_cakes(500, gen)
    test_x, test_y = recipe_scale(test), cake_quality(test)
    torch.manual_seed(seed)
    model = MLP(MLPConfig(d_in=3, n_out=1, n_layer=1, d_model=hidden, activation="tanh",
                          loss="mse"))
    names = weight_names(model, tuple(r[0] for r in RECIPE))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def test_error() -> float:
        with torch.no_grad():
            return (model(test_x)[:, 0] - test_y).abs().mean().item()

    history, trajectory = [], [_flat(model)]
    before = test_error()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        baked = random_cakes(1, gen)  # (1, 3)
        tasted = cake_quality(baked)  # (1,)
        predicted = model(recipe_scale(baked))  # (1, 1)
        loss = model.loss(predicted, tasted)
        loss.backward()  # backpropagation: d loss / d every weight
        done = sgd_step(model, lr)
        grads = {n: g.flatten().tolist() for n, (g, _) in done.items()}
        moves = {n: m.flatten().tolist() for n, (_, m) in done.items()}
        history.append(CakeStep(step, baked[0].tolist(), predicted.item(), tasted.item(),
                                loss.item(), grads, moves, test_error()))
        trajectory.append(_flat(model))
    seconds = time.perf_counter() - t0
    average = statistics.mean(s.tasted for s in history)  # of the cakes it was shown
    always_mean = (test_y - average).abs().mean().item()
    result = {"history": history, "test_error_before": before, "test_error_after":
              history[-1].test_error, "test_error_guess_mean": always_mean, "model": model,
              "names": names, "seconds": seconds, "lr": lr, "test": (test_x, test_y)}
    result["table"] = _cake_table(result, start, shown, every)
    say(result["table"])
    result["png"] = plot_cake(history, torch.stack(trajectory), names, out / "basics-cake.png")
    say(f"wrote {result['png']}")
    return result


def _flat(model: MLP) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _cake_line(s: CakeStep, names: dict[str, list[str]]) -> str:
    flat = [(n, m) for key, ms in s.moves.items() for n, m in zip(names[key], ms)]
    name, biggest = max(flat, key=lambda t: abs(t[1]))
    recipe = ", ".join(f"{v:4.0f} {u}" for v, (_, u, _, _) in zip(s.settings, RECIPE))
    return (f"{s.step:>5}  {recipe:<26} {s.predicted:>9.2f} {s.tasted:>7.2f} "
            f"{s.predicted - s.tasted:>+7.2f}  {name:>16} {biggest:>+8.4f} {s.test_error:>9.2f}")


def _cake_table(r: dict[str, Any], start: dict[str, torch.Tensor], shown: int, every: int
                ) -> str:
    h, names, lr = r["history"], r["names"], r["lr"]
    first = h[0]
    intro = (f"A network guesses a cake's taste (0-10) from sugar, mixing time and oven "
             f"temperature. Each step it bakes one cake, compares its guess with the taste, "
             f"and every weight moves by -{lr} x (its gradient): a little, in the direction "
             f"that makes the next guess better.")
    lines = [textwrap.fill(intro, 96), "",
             f"Step 1 in full: guessed {first.predicted:.2f}, tasted {first.tasted:.2f}, "
             f"error {first.predicted - first.tasted:+.2f}, loss (error^2) {first.loss:.2f}",
             f"  {'weight':<18} {'before':>8} {'gradient':>9} {'move':>8} {'after':>8}"]
    for key, ms in first.moves.items():
        for n, old, g, m in zip(names[key], start[key].flatten().tolist(), first.grads[key], ms):
            lines.append(f"  {n:<18} {old:>+8.3f} {g:>+9.3f} {m:>+8.4f} {old + m:>+8.3f}")
    lines += ["", f"{'step':>5}  {'cake (sugar, mixing, oven)':<26} {'guessed':>9} "
                  f"{'tasted':>7} {'error':>7}  {'biggest move':>25} {'test err':>9}",
              f"{'':>5}  {'':<26} {'':>9} {'':>7} {'':>7}  {'':>25} "
              f"{r['test_error_before']:>9.2f}  (before training)"]
    for s in h:
        if s.step <= shown or s.step % every == 0:
            lines.append(_cake_line(s, names))
    lines += ["", textwrap.fill(
        f"Held-out cakes, mean |guess - taste|: {r['test_error_before']:.2f} before, "
        f"{r['test_error_after']:.2f} after {len(h)} cakes (always guessing the average "
        f"taste: {r['test_error_guess_mean']:.2f}).", 96)]
    return "\n".join(lines)


def plot_cake(history: list[CakeStep], trajectory: torch.Tensor, names: dict[str, list[str]],
              path: Path) -> Path:
    """Left: each cake's squared error and the held-out error, by step. Right: every weight's
    value by step (trajectory: (steps + 1, n_weights))."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [s.step for s in history]
    ax.scatter(steps, [abs(s.predicted - s.tasted) for s in history], s=4, alpha=0.4,
               label="|error| on the cake just baked")
    ax.plot(steps, [s.test_error for s in history], color="C3", lw=2,
            label="mean |error| on 500 held-out cakes")
    ax.set_xlabel("step (one cake each)")
    ax.set_ylabel("taste points")
    ax.set_title("the guesses get better", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    flat_names = [n for ns in names.values() for n in ns]
    for i, n in enumerate(flat_names):
        bx.plot(range(len(trajectory)), trajectory[:, i].numpy(), lw=1.2,
                ls="-" if "bias" not in n else "--", label=n)
    bx.set_xlabel("step")
    bx.set_ylabel("weight value")
    bx.set_title("how each weight moved", fontsize=10)
    bx.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path)


# --- 3. shallow vs deep: two spirals --------------------------------------------------------
def make_spirals(n: int, gen: torch.Generator, turns: float = 2.0, noise: float = 0.02
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (n, 2) on two interleaved spirals, labels (n,): class c winds out from the
    centre at angle 2 pi turns t + pi c, radius 0.1 + 0.9 t, t uniform in [0, 1)."""
    t = torch.rand(n, generator=gen)
    label = torch.randint(2, (n,), generator=gen)
    radius = 0.1 + 0.9 * t
    angle = 2 * math.pi * turns * t + math.pi * label
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return x + noise * torch.randn(n, 2, generator=gen), label  # (n, 2), (n,)


LIMIT = 1.25  # the input plane drawn: [-LIMIT, LIMIT]^2


def plane_grid(n: int = 120) -> torch.Tensor:
    """n*n points covering the drawn plane, row by row from the top: (n * n, 2)."""
    xs = torch.linspace(-LIMIT, LIMIT, n)
    yy, xx = torch.meshgrid(xs.flip(0), xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)


@dataclass
class SpiralsConfig:
    seeds: int = 5  # runs per network, on fresh data and weights each
    n_train: int = 600
    n_test: int = 2000
    turns: float = 3.0  # at 2 turns a well-tuned shallow net ties (docs/basics.md)
    n_layer: int = 4  # hidden layers of the deep network
    d_model: int = 16  # its width; the shallow one is as wide as the same weights allow
    activation: str = "relu"
    steps: int = 300
    lr: float = 0.1  # AdamW; the best of a sweep 0.003 ... 1.0 for both (docs/basics.md)
    batch_size: int = 600  # >= n_train: every step sees all the training points
    frames: int = 16  # GIF frames of the first seed's training
    grid: int = 120  # pixels per side of the boundary pictures

    def __post_init__(self):
        if self.seeds < 1 or self.steps < 1 or self.n_layer < 2:
            raise ValueError("need seeds >= 1, steps >= 1, and a deep net of n_layer >= 2")

    def networks(self) -> dict[str, MLPConfig]:
        """The deep network and its shallow twin with (nearly) the same weight count."""
        deep = MLPConfig(d_in=2, n_out=2, n_layer=self.n_layer, d_model=self.d_model,
                         activation=self.activation)
        return {"deep": deep, "shallow": shallow_twin(deep)}


def spirals(out: Path, seed: int = 0, cfg: SpiralsConfig | None = None, say: Say = print
            ) -> dict[str, Any]:
    """Shallow against deep at equal weight count, over cfg.seeds seeds (seed, seed + 1, ...):
    held-out accuracy as mean and spread, the first seed's decision boundaries and what each
    of the deep network's layers responds to, and a GIF of both boundaries forming."""
    cfg = cfg or SpiralsConfig()
    out = _folder(out)
    grid = plane_grid(cfg.grid)
    runs: dict[str, list[dict[str, Any]]] = {"shallow": [], "deep": []}
    keep: dict[str, Any] = {}
    for s in range(seed, seed + cfg.seeds):
        gen = torch.Generator().manual_seed(s)
        x_train, y_train = make_spirals(cfg.n_train, gen, cfg.turns)
        x_test, y_test = make_spirals(cfg.n_test, gen, cfg.turns)
        for name, mcfg in cfg.networks().items():
            frames = [] if s == seed else None
            run = _train_spiral_net(mcfg, cfg, s, x_train, y_train, grid, frames,
                                    out / "spirals-runs" / f"{name}-seed{s}")
            run["test_accuracy"] = accuracy(run["model"], x_test, y_test)
            runs[name].append(run)
            if s == seed:
                keep[name] = run
                keep["data"] = (x_train, y_train, x_test, y_test)
    result = {"runs": runs, "summary": _spirals_summary(runs), "config": cfg}
    result["table"] = _spirals_table(result["summary"], cfg, seed)
    say(result["table"])
    x_train, y_train, *_ = keep["data"]
    result["png"] = plot_boundaries(keep, grid, cfg, x_train, y_train,
                                    out / "basics-spirals.png")
    result["layers_png"] = plot_layers(keep["deep"]["model"], grid, cfg, x_train, y_train,
                                       out / "basics-spirals-layers.png")
    result["gif"] = animate_boundaries(keep, cfg, x_train, y_train, out / "basics-spirals.gif")
    result["model"], result["test"] = keep["deep"]["model"], keep["data"][2:]
    say(f"wrote {result['png']}, {result['layers_png']} and {result['gif']}")
    return result


def _train_spiral_net(mcfg: MLPConfig, cfg: SpiralsConfig, seed: int, x: torch.Tensor,
                      y: torch.Tensor, grid: torch.Tensor, frames: list | None, run_dir: Path
                      ) -> dict[str, Any]:
    """One network on one seed; with `frames` a list, it collects (step, P(class 1) on the
    grid) about cfg.frames times during training (the loop's eval hook)."""
    torch.manual_seed(seed)
    model = MLP(mcfg)
    every = max(1, cfg.steps // cfg.frames) if frames is not None else 0
    step = [0]

    def snapshot(m: MLP) -> dict[str, float]:
        step[0] += every
        frames.append((min(step[0], cfg.steps), torch.softmax(m(grid), -1)[:, 1].clone()))
        return {"train_accuracy": accuracy(m, x, y)}

    if frames is not None:
        with torch.no_grad():
            frames.append((0, torch.softmax(model(grid), -1)[:, 1]))
    t0 = time.perf_counter()
    res = fit(model, x, y, run_dir, steps=cfg.steps, lr=cfg.lr, seed=seed,
              batch_size=cfg.batch_size, eval_fn=snapshot if frames is not None else None,
              eval_every=every)
    model.eval()
    return {"model": model, "seconds": time.perf_counter() - t0, "loss": res.get("loss"),
            "train_accuracy": accuracy(model, x, y), "frames": frames, "seed": seed}


def _spirals_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rs in runs.items():
        accs = [r["test_accuracy"] for r in rs]
        c = rs[0]["model"].config
        out[name] = {"layers": c.n_layer, "width": c.d_model,
                     "weights": rs[0]["model"].num_params(),
                     "test_mean": statistics.mean(accs),
                     "test_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "test_min": min(accs), "test_max": max(accs), "test": accs,
                     "train_mean": statistics.mean(r["train_accuracy"] for r in rs),
                     "seconds": statistics.mean(r["seconds"] for r in rs)}
    return out


def _spirals_table(summary: dict[str, dict[str, Any]], cfg: SpiralsConfig, seed: int) -> str:
    seeds = f"seeds {seed}-{seed + cfg.seeds - 1}" if cfg.seeds > 1 else f"seed {seed}"
    lines = [f"Two spirals ({cfg.turns:g} turns), {cfg.n_train} training points, held-out "
             f"accuracy on {cfg.n_test}; {cfg.steps} steps each, {seeds}:",
             f"{'network':<9} {'hidden layers':>13} {'weights':>8} {'lr':>6} "
             f"{'held-out mean':>14} {'spread (sd)':>11} {'min-max':>13} {'train':>7} "
             f"{'s/run':>6}"]
    for name in ("shallow", "deep"):
        r = summary[name]
        layers = f"{r['layers']} x {r['width']}"
        lines.append(f"{name:<9} {layers:>13} {r['weights']:>8,} {cfg.lr:>6g} "
                     f"{r['test_mean']:>14.1%} {r['test_sd']:>11.1%} "
                     f"{r['test_min']:>6.1%}-{r['test_max']:<6.1%} {r['train_mean']:>7.1%} "
                     f"{r['seconds']:>6.2f}")
    return "\n".join(lines)


def _plane(ax, image: torch.Tensor, n: int, cmap: str = "RdBu", vmin=0.0, vmax=1.0) -> None:
    ax.imshow(image.reshape(n, n).numpy(), extent=(-LIMIT, LIMIT, -LIMIT, LIMIT), cmap=cmap,
              vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _points(ax, x: torch.Tensor, y: torch.Tensor, size: float = 3) -> None:
    colours = ["#b2182b" if v == 0 else "#2166ac" for v in y.tolist()]
    ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), c=colours, s=size, edgecolors="white",
               linewidths=0.2)


def plot_boundaries(keep: dict[str, Any], grid: torch.Tensor, cfg: SpiralsConfig,
                    x: torch.Tensor, y: torch.Tensor, path: Path) -> Path:
    """The two networks' decision regions (P(class 1)) over the plane, side by side."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4), layout="constrained")
    for ax, name in zip(axes, ("shallow", "deep")):
        run = keep[name]
        with torch.no_grad():
            _plane(ax, torch.softmax(run["model"](grid), -1)[:, 1], cfg.grid)
        _points(ax, x, y)
        c = run["model"].config
        ax.set_title(f"{name}: {c.n_layer} x {c.d_model}, {run['model'].num_params()} weights"
                     f"\nheld-out accuracy {run['test_accuracy']:.1%}", fontsize=9)
    return _save(fig, path)


def responsive_units(states: torch.Tensor, k: int) -> list[int]:
    """The k units whose activation varies most over the plane (states: (points, units)):
    dead or constant units show nothing worth drawing."""
    return states.std(0).argsort(descending=True)[:k].tolist()


def plot_layers(model: MLP, grid: torch.Tensor, cfg: SpiralsConfig, x: torch.Tensor,
                y: torch.Tensor, path: Path, k: int = 4) -> Path:
    """One row per hidden layer of the deep net: where k of its units fire over the input
    plane (the unit's activation at every point), and the net's output in the last row."""
    plt = _plt()
    with torch.no_grad():
        states = model.hidden_states(grid)  # n_layer x (points, d_model)
        prob = torch.softmax(model(grid), -1)[:, 1]
    fig, axes = plt.subplots(len(states) + 1, k, figsize=(1.9 * k, 1.95 * (len(states) + 1)))
    for row, h in enumerate(states):
        for col, unit in enumerate(responsive_units(h, k)):
            ax = axes[row, col]
            low = 0.0 if cfg.activation == "relu" else h[:, unit].min().item()
            _plane(ax, h[:, unit], cfg.grid, cmap="magma", vmin=low,
                   vmax=max(h[:, unit].max().item(), low + 1e-6))
            ax.set_title(f"layer {row + 1}, unit {unit + 1}", fontsize=8)
    _plane(axes[-1, 0], prob, cfg.grid)
    _points(axes[-1, 0], x, y, size=1)
    axes[-1, 0].set_title("output: P(blue)", fontsize=8)
    for ax in axes[-1, 1:]:
        ax.axis("off")
    axes[-1, 1].text(0.0, 0.5, "bright = the unit fires.\nLayer 1 cuts the plane with\n"
                     "straight lines; each layer\nabove bends and folds the\nregions of the "
                     "one below.", fontsize=8, va="center", transform=axes[-1, 1].transAxes)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def animate_boundaries(keep: dict[str, Any], cfg: SpiralsConfig, x: torch.Tensor,
                       y: torch.Tensor, path: Path) -> Path:
    """GIF of both decision regions forming during training (matplotlib's animation, Pillow
    writer), written beside and then moved into `path` atomically."""
    plt = _plt()
    from matplotlib.animation import FuncAnimation, PillowWriter

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    images = []
    for ax, name in zip(axes, ("shallow", "deep")):
        _, first = keep[name]["frames"][0]
        images.append(ax.imshow(first.reshape(cfg.grid, cfg.grid).numpy(), cmap="RdBu", vmin=0,
                                vmax=1, extent=(-LIMIT, LIMIT, -LIMIT, LIMIT)))
        _points(ax, x, y, size=1)
        ax.set_xticks([])
        ax.set_yticks([])
    title = fig.suptitle("", fontsize=9)
    n = min(len(keep["shallow"]["frames"]), len(keep["deep"]["frames"]))

    def draw(i: int):
        for img, ax, name in zip(images, axes, ("shallow", "deep")):
            step, frame = keep[name]["frames"][i]
            img.set_data(frame.reshape(cfg.grid, cfg.grid).numpy())
            ax.set_title(f"{name} ({keep[name]['model'].num_params()} weights)", fontsize=8)
        title.set_text(f"step {keep['deep']['frames'][i][0]} of {cfg.steps}")
        return images

    fig.tight_layout()
    anim = FuncAnimation(fig, draw, frames=list(range(n)) + [n - 1] * 4, blit=False)
    with tempfile.TemporaryDirectory() as tmp:
        gif = Path(tmp) / "anim.gif"
        anim.save(gif, writer=PillowWriter(fps=6), dpi=60)
        plt.close(fig)
        atomic_write_bytes(path, gif.read_bytes())
    return Path(path)


# --- 4. --trace: one example, forward and backward by hand ----------------------------------
@dataclass
class LayerTrace:
    name: str  # "layer 1" ... or "head"
    z: torch.Tensor  # pre-activation W a_below + b (d,)
    a: torch.Tensor  # activation f(z) (d,); the head's a is z (logits / values)
    dz: torch.Tensor | None = None  # d loss / d z (d,)
    da: torch.Tensor | None = None  # d loss / d a (d,); None for the head
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> d loss / d it


@dataclass
class Trace:
    x: torch.Tensor
    target: torch.Tensor
    layers: list[LayerTrace]
    loss: float

    def grads(self) -> dict[str, torch.Tensor]:
        return {k: v for layer in self.layers for k, v in layer.grads.items()}


def trace(model: MLP, x: torch.Tensor, target: torch.Tensor) -> Trace:
    """One example (x: (d_in,), target: a class id or values) through `model`, worked by hand
    in float64: forward z = W a + b, a = f(z) per layer, then the loss, then the chain rule
    from the loss down: dL/dz = dL/da * f'(z), dL/dW = outer(dL/dz, a_below), dL/db = dL/dz,
    dL/da_below = W^T dL/dz. Autograd is not used, so a test can hold it against both finite
    differences and autograd."""
    c = model.config
    linears = [*model.hidden, model.head]
    names = [f"hidden.{i}" for i in range(len(model.hidden))] + ["head"]
    a = x.double()
    belows, records = [], []
    for i, layer in enumerate(linears):  # forward
        belows.append(a)
        z = layer.weight.double() @ a + layer.bias.double()  # (d,)
        last = i == len(linears) - 1
        a = z if last else (z.clamp(min=0) if c.activation == "relu" else z.tanh())
        records.append(LayerTrace("head" if last else f"layer {i + 1}", z, a))
    loss, dz = _loss_and_grad(c, records[-1].z, target)  # dL/d output
    for i in reversed(range(len(linears))):  # backward
        rec = records[i]
        if i < len(linears) - 1:  # a hidden layer: back through the one above, then f
            rec.da = linears[i + 1].weight.double().T @ dz  # (d,)
            slope = (rec.z > 0).double() if c.activation == "relu" else 1 - rec.a ** 2
            dz = rec.da * slope  # f'(z)
        rec.dz = dz
        rec.grads = {f"{names[i]}.weight": torch.outer(dz, belows[i]),  # (d, d_below)
                     f"{names[i]}.bias": dz}
    return Trace(x.double(), target, records, loss)


def _loss_and_grad(c: MLPConfig, out: torch.Tensor, target: torch.Tensor
                   ) -> tuple[float, torch.Tensor]:
    """The loss of one example's output and its gradient d loss / d output."""
    if c.loss == "mse":
        t = target.double().reshape(out.shape)
        return ((out - t) ** 2).mean().item(), 2 * (out - t) / out.numel()
    if c.n_out == 1:  # logistic: L = -log sigmoid(+-out), dL/dout = sigmoid(out) - y
        p, t = torch.sigmoid(out), target.double()
        return -(t * p.log() + (1 - t) * (1 - p).log()).sum().item(), p - t
    p = torch.softmax(out, -1)
    onehot = torch.zeros_like(p)
    onehot[int(target)] = 1.0
    return -p[int(target)].log().item(), p - onehot  # dL/dlogits = softmax - onehot


def finite_differences(model: MLP, x: torch.Tensor, target: torch.Tensor, eps: float = 1e-6
                       ) -> dict[str, torch.Tensor]:
    """d loss / d every weight by central differences (L(w + eps) - L(w - eps)) / 2 eps, on
    a float64 copy of the model: the slow, assumption-free check of backpropagation."""
    m = MLP(model.config).double()
    m.load_state_dict(model.state_dict())
    xb = x.double().reshape(1, -1)  # a batch of one
    tb = target.reshape(1, -1) if model.config.loss == "mse" else target.reshape(1)
    grads = {}
    with torch.no_grad():
        for name, p in m.named_parameters():
            g = torch.zeros_like(p)
            flat, gflat = p.view(-1), g.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + eps
                up = m(xb, tb).item()
                flat[j] = old - eps
                down = m(xb, tb).item()
                flat[j] = old
                gflat[j] = (up - down) / (2 * eps)
            grads[name] = g
    return grads


def _vec(v: torch.Tensor, limit: int = 16) -> str:
    vals = " ".join(f"{t + 0.0:+.3f}" for t in v[:limit].tolist())  # + 0.0: no "-0.000"
    return f"[{vals}{f' ... {len(v) - limit} more' if len(v) > limit else ''}]"


def format_trace(tr: Trace, model: MLP) -> str:
    """The trace as text: the forward pass, the loss, the backward pass, layer by layer."""
    c = model.config
    f = "relu" if c.activation == "relu" else "tanh"
    slope = "1[z > 0]" if f == "relu" else "(1 - a^2)"
    lines = [f"Trace of one example: x = {_vec(tr.x)}, target {_vec(tr.target.reshape(-1))}",
             "forward (each layer: z = W a_below + b, then a = f(z))"]
    for rec in tr.layers:
        if rec.name == "head":
            lines.append(f"  head     output   = W a + b     {_vec(rec.z)}")
        else:
            lines += [f"  {rec.name:<8} z        = W a + b     {_vec(rec.z)}",
                      f"  {'':<8} a        = {f}(z)      {_vec(rec.a)}"]
    lines += [f"  loss     {tr.loss:.6f}", "backward (chain rule, from the loss down)"]
    for rec in reversed(tr.layers):
        (wname, gw), (_, gb) = rec.grads.items()
        if rec.name == "head":
            lines.append(f"  head     dL/doutput                  {_vec(rec.dz)}")
        else:
            lines += [f"  {rec.name:<8} dL/da    = W_above^T dL/dz   {_vec(rec.da)}",
                      f"  {'':<8} dL/dz    = dL/da * {slope:<9} {_vec(rec.dz)}"]
        lines.append(f"  {'':<8} dL/dW    = outer(dL/dz, a_below): {tuple(gw.shape)}, "
                     f"size {gw.norm():.4f}; dL/db = dL/dz")
    return "\n".join(lines)


@torch.no_grad()
def hardest_example(model: MLP, x: torch.Tensor, y: torch.Tensor, n: int = 200) -> int:
    """Index of the example (of the first n) with the highest loss: its gradients are the
    ones worth looking at (a well-learnt example's are all about zero)."""
    return max(range(min(n, len(x))), key=lambda i: model(x[i : i + 1], y[i : i + 1]).item())


def trace_report(model: MLP, x: torch.Tensor, target: torch.Tensor, say: Say = print
                 ) -> dict[str, Any]:
    """trace() printed, and checked against finite differences in float64."""
    tr = trace(model, x, target)
    fd = finite_differences(model, x, target)
    worst = max((g - fd[k]).abs().max().item() for k, g in tr.grads().items())
    text = format_trace(tr, model) + (
        f"\ncheck: all {sum(g.numel() for g in fd.values())} gradients against finite "
        f"differences (float64, eps 1e-6): largest difference {worst:.1e}")
    say(text)
    return {"trace": tr, "finite_differences": fd, "max_difference": worst, "text": text}


# --- the command ----------------------------------------------------------------------------
def run_basics(name: str, out: Path = Path("runs/basics"), seed: int = 0,
               with_trace: bool = False, say: Say = print) -> dict[str, Any]:
    """`tinylm basics NAME [--trace]`: one demo, then (with_trace) one held-out example of it
    traced through its trained network."""
    out = _folder(out)
    t0 = time.perf_counter()
    if name == "cats-dogs":
        result = cats_dogs(out, seed, say=say)
        mean, std = result["scale"]
        x, y = result["test"]
        x = (x - mean) / std  # what the neuron reads
    elif name == "cake":
        result = cake(out, seed, say=say)
        x, y = result["test"]
        y = y[:, None]  # (n, 1): one value per cake
    elif name == "spirals":
        result = spirals(out, seed, say=say)
        x, y = result["test"]
    else:
        raise UserError(f"unknown demo {name!r}; pick one of {', '.join(DEMOS)}")
    if with_trace:
        i = hardest_example(result["model"], x, y)
        say("\nThe held-out example (of the first 200) the trained network gets most wrong:")
        result["trace"] = trace_report(result["model"], x[i], y[i], say=say)
    result["seconds"] = time.perf_counter() - t0
    say(f"({result['seconds']:.1f} s)")
    return result
